"""A misbehaving client in a real Flower simulation (tests/hostile_client.py, never in the default path): each
misbehaviour is refused naming the node; a client asleep past the reply timeout neither holds the run (its actor is
abandoned) nor gets an honest client blamed; the terminal shows one error line and no traceback."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

import fl.federation.simulation as simulation
from fl.federation.rounds import CentralEvaluator, StrategyJob
from fl.federation.simulation import SimulationFailed, run_strategy
from fl.studies.baselines import FEDAVG
from tests.conftest import probed_start, tiny_run_config
from tests.hostile_client import hostile_client_app

REPO = Path(__file__).resolve().parents[1]
SLEEPER = "node [0-9]+ \\(bio-0\\)"


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir: Path, toy_csvs: tuple[Path, Path]):
    config = tiny_run_config(tiny_model_dir, toy_csvs, rounds=1)
    workbench, start, base_scores = probed_start(config, tiny_model_dir)
    return config, workbench, start, base_scores


@pytest.mark.parametrize(
    ("behaviour", "needle"),
    [
        ("missing-key", "the reply lacks key 'encoder."),
        ("float16", "key 'encoder[.][^']+' has dtype torch.float16, expected torch.float32"),
        ("bool-metric", "metric 'train-loss' is True \\(bool\\): expected a real number"),
        ("string-eval-metric", "metric 'eval-accuracy' is 'high' \\(str\\): expected a real number"),
    ],
)
def test_a_malformed_reply_is_refused_naming_the_node(tiny_run, behaviour: str, needle: str, monkeypatch: pytest.MonkeyPatch) -> None:
    config, workbench, start, base_scores = tiny_run
    config = replace(config, client_eval=behaviour == "string-eval-metric")
    monkeypatch.setattr(simulation, "make_client_app", lambda cfg=None: hostile_client_app(cfg, behaviour))
    evaluator = CentralEvaluator(workbench.model, workbench.test_sets, behaviour, initial_scores=base_scores)

    with pytest.raises(SimulationFailed, match=f"{SLEEPER}: {needle}"):
        run_strategy(StrategyJob(config, FEDAVG, start, evaluator))


def run_hostile(behaviour: str, tmp_path: Path, tiny_model_dir: Path, toy_csvs: tuple[Path, Path], *flags: str) -> subprocess.CompletedProcess:
    """bio_legal.py with the hostile client on bio-0, tiny model, 3 rounds; fails the test if it runs 15 minutes (a
    client asleep for an hour would otherwise hold it that long)."""
    bio, legal = toy_csvs
    options = ["--model", str(tiny_model_dir), "--bio-data", str(bio), "--legal-data", str(legal), "--train-size", "60"]
    options += ["--test-size", "24", "--max-length", "16", "--rounds", "3", "--local-steps", "2", "--batch-size", "8"]
    options += ["--strategies", "fedavg", "--out", str(tmp_path / "out"), *flags]
    command = [sys.executable, "-m", "tests.hostile_client", behaviour, "sims/bio_legal.py", *options]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_a_client_asleep_past_the_timeout_fails_the_run_in_one_line_without_waiting_for_it(tmp_path: Path, tiny_model_dir, toy_csvs) -> None:
    done = run_hostile("asleep", tmp_path, tiny_model_dir, toy_csvs, "--reply-timeout", "45")

    assert done.returncode == 3, done.stderr[-3000:]
    (line,) = error_lines(done.stderr)
    assert "round 2 train: 1 replies for 2 clients after the reply timeout of 45 s: no reply from node" in line and "(bio-0)" in line
    assert "Traceback" not in done.stderr and "Traceback" in (tmp_path / "out" / "error.log").read_text()


def test_with_continue_the_run_finishes_without_the_sleeper_and_records_its_drop(tmp_path: Path, tiny_model_dir, toy_csvs) -> None:
    done = run_hostile("asleep", tmp_path, tiny_model_dir, toy_csvs, "--reply-timeout", "45", "--on-node-loss", "continue")

    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    history = json.loads((tmp_path / "out" / "results.json").read_text())["strategies"]["fedavg"]["clients"]
    assert [sorted(c["client"].split(" ")[-1] for c in h["clients"]) for h in history] == [["(bio-0)", "(legal-0)"], ["(legal-0)"], ["(legal-0)"]]
    assert [[(lost["stage"], lost["node"].split(" ")[-1]) for lost in h["lost"]] for h in history] == [[], [("train", "(bio-0)")], []]


def test_a_string_count_is_refused_in_one_line_naming_the_node(tmp_path: Path, tiny_model_dir, toy_csvs) -> None:
    done = run_hostile("string-metric", tmp_path, tiny_model_dir, toy_csvs)

    assert done.returncode == 3, done.stderr[-3000:]
    (line,) = error_lines(done.stderr)
    assert "(bio-0): metric 'num-examples' is '32' (str): expected an integer" in line
    assert "Traceback" not in done.stderr
