"""Checkpoints and the run folder: refusals before any work, atomic files, and a killed run resumed to the same end.

The process-level tests run ``sims/bio_legal.py`` in a subprocess on the tiny model (about 20 s each): a run
is killed (SIGKILL) or interrupted (SIGINT/SIGTERM) as soon as its first round is checkpointed.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import torch

from fl.modeling.evaluation import Score
from fl.modeling.folder import load_merged
from fl.run import files
from fl.run.checkpoint import RunFolder, check_out, run_identity
from fl.run.config import ConfigError, RunConfig
from strategies.rules import settings
from tests.conftest import FINANCE_WORDS, write_domain_csv

ROOT = Path(__file__).resolve().parents[1]


def identity(**changes: object) -> dict[str, object]:
    return run_identity(replace(RunConfig(), **changes), settings(["fedavg"], {}))


def started_folder(out: Path) -> RunFolder:
    folder = RunFolder(out, identity())
    folder.open()
    return folder


def test_a_used_folder_is_refused_without_resume_or_overwrite(tmp_path: Path) -> None:
    started_folder(tmp_path / "run")

    with pytest.raises(ConfigError, match="already holds results or a checkpoint: pass --resume .* or --overwrite"):
        check_out(tmp_path / "run", identity(), resume=False, overwrite=False)
    check_out(tmp_path / "run", identity(), resume=False, overwrite=True)
    check_out(tmp_path / "run", identity(), resume=True, overwrite=False)


@pytest.mark.parametrize(
    ("setup", "resume", "needle"),
    [
        ("file", False, "is a file, expected a folder"),
        ("empty", True, "holds no checkpoint to resume"),
        ("read-only", False, "cannot write in"),
    ],
)
def test_an_unusable_out_is_refused_in_one_line(tmp_path: Path, setup: str, resume: bool, needle: str) -> None:
    out = tmp_path / "run"
    if setup == "file":
        out.write_text("not a folder")
    elif setup == "read-only":
        tmp_path.chmod(0o500)
        if os.access(tmp_path, os.W_OK):  # root writes anywhere
            tmp_path.chmod(0o700)
            pytest.skip("running as root: every folder is writable")
    try:
        with pytest.raises(ConfigError, match=needle):
            check_out(out, identity(), resume=resume, overwrite=False)
    finally:
        tmp_path.chmod(0o700)
    assert not out.is_dir()


def test_resume_with_a_changed_option_names_it(tmp_path: Path) -> None:
    started_folder(tmp_path / "run")

    with pytest.raises(ConfigError, match=r"differs from the run in .*: lr 0.0002 -> 0.001; seed 0 -> 3"):
        check_out(tmp_path / "run", identity(lr=1e-3, seed=3), resume=True, overwrite=False)


def score(accuracy: float) -> Score:
    return Score(accuracy, accuracy, 0.5, torch.rand(8).numpy() < accuracy)


def test_a_checkpoint_round_trips_weights_scores_and_strategy_state(tmp_path: Path) -> None:
    checkpoint = started_folder(tmp_path / "run").strategy("fedavg")
    weights = {"w": torch.randn(3, 4), "position_ids": torch.arange(4)}
    scores = {0: {"bio": score(0.5)}, 1: {"bio": score(0.75)}}

    checkpoint.save(1, weights, {"client-history": [{"round": 1}]}, scores)
    loaded = checkpoint.load()

    assert loaded is not None and loaded.server_round == 1 and not loaded.finished
    assert all(torch.equal(loaded.weights[k], weights[k]) for k in weights)
    assert (loaded.scores[1]["bio"].correct == scores[1]["bio"].correct).all()
    assert loaded.strategy_state == {"client-history": [{"round": 1}]}


def test_a_crash_between_writing_and_renaming_leaves_the_previous_checkpoint_loadable(tmp_path: Path, monkeypatch) -> None:
    checkpoint = started_folder(tmp_path / "run").strategy("fedavg")
    checkpoint.save(1, {"w": torch.ones(2)}, {}, {})

    def crash(*_args: object) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        checkpoint.save(2, {"w": torch.full((2,), 2.0)}, {}, {})
    monkeypatch.undo()

    loaded = checkpoint.load()
    assert loaded is not None and loaded.server_round == 1 and torch.equal(loaded.weights["w"], torch.ones(2))
    assert not list(checkpoint.folder.glob(".*partial"))


# --- whole runs in subprocesses -------------------------------------------------------------------------------


def tiny_argv(model: Path, data: tuple[Path, ...], out: Path, rounds: int = 3) -> list[str]:
    """The headline script on the tiny model: two data files as --bio-data and --legal-data, more as --domain each."""
    if len(data) == 2:
        domains = ["--bio-data", str(data[0]), "--legal-data", str(data[1])]
    else:
        domains = [a for i, path in enumerate(data) for a in ("--domain", f"d{i}={path}")]
    return [
        sys.executable, str(ROOT / "sims" / "bio_legal.py"), "--model", str(model), *domains, "--train-size", "60",
        "--test-size", "24", "--max-length", "16", "--batch-size", "8", "--rounds", str(rounds), "--local-steps", "2",
        "--strategies", "fedavg", "--out", str(out),
    ]  # fmt: skip


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=1800, cwd=ROOT)


def start_and_wait_for(argv: list[str], path: Path, log: Path) -> tuple[subprocess.Popen[bytes], list[psutil.Process]]:
    """Start a run (its output to `log`: a full pipe would stall it); return once `path` exists, with the processes
    the run had started by then."""
    with log.open("wb") as sink:
        process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 1200  # a safety net, not a judgement: about 30 s on a quiet machine
    while not path.exists():
        assert process.poll() is None, log.read_text()[-3000:]
        if time.monotonic() > deadline:
            for child in [*psutil.Process(process.pid).children(recursive=True), process]:
                child.kill()
            raise AssertionError(f"no {path.name} in 1200 s")
        time.sleep(0.1)
    return process, psutil.Process(process.pid).children(recursive=True)


def round_1(out: Path) -> Path:
    return out / "checkpoints" / "fedavg" / "state.json"


def alive(processes: list[psutil.Process]) -> list[int]:
    found = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return found


def final_state(out: Path) -> dict[str, torch.Tensor]:
    model, _ = load_merged(out / "fedavg")
    return model.state_dict()


def rounds_of(out: Path) -> list[dict[str, object]]:
    return json.loads((out / "results.json").read_text())["strategies"]["fedavg"]["rounds"]


def test_a_run_killed_after_round_1_resumes_to_the_weights_and_metrics_of_an_uninterrupted_run(tiny_model_dir, toy_csvs, tmp_path) -> None:
    """With three domains (--domain): the run, its checkpoints and its transfer table follow the domains given."""
    toy_csvs = (*toy_csvs, write_domain_csv(tmp_path / "finance.csv", FINANCE_WORDS, 120, 2))
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    process, started = start_and_wait_for(tiny_argv(tiny_model_dir, toy_csvs, killed), round_1(killed), tmp_path / "killed.log")
    process.kill()
    process.wait()
    for p in started:  # SIGKILL gives the run no chance to stop Ray: do it here
        p.kill()
    completed = files.read_json(killed / "checkpoints" / "fedavg" / "state.json")["round"]
    assert completed < 3

    resumed = run([*tiny_argv(tiny_model_dir, toy_csvs, killed), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "baselines read back" in resumed.stderr and f"resuming after round {completed} of 3" in resumed.stderr
    uninterrupted = run(tiny_argv(tiny_model_dir, toy_csvs, whole))
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]

    a, b = final_state(killed), final_state(whole)
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) <= 1e-6
    assert rounds_of(killed) == rounds_of(whole)
    transfer = json.loads((whole / "results.json").read_text())["transfer"]
    assert list(transfer) == ["d0-expert", "d1-expert", "d2-expert"] and all(list(row) == ["d0", "d1", "d2"] for row in transfer.values())
    assert "| d2-expert |" in (whole / "results.md").read_text() and (whole / "transfer.png").stat().st_size > 1000
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in whole.rglob("*") if p.is_file()}
    again = run(tiny_argv(tiny_model_dir, toy_csvs, whole))
    assert again.returncode == 2 and again.stderr.strip().splitlines() == [
        f"error: --out {whole} already holds results or a checkpoint: pass --resume to continue it or --overwrite to replace it"
    ]
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in whole.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(
    ("sent", "code", "when", "progress"),
    [
        (signal.SIGINT, 130, "round 1", "after round "),  # Flower and Ray running
        (signal.SIGTERM, 143, "start", "before any strategy round completed"),  # the baselines, no Ray yet
    ],
)
def test_an_interrupted_run_exits_within_seconds_with_a_resume_line_and_no_process_left(
    tiny_model_dir, toy_csvs, tmp_path, sent: signal.Signals, code: int, when: str, progress: str
) -> None:
    out, log = tmp_path / "run", tmp_path / "run.log"
    wait_for = round_1(out) if when == "round 1" else out / "checkpoints" / "run.json"
    process, started = start_and_wait_for(tiny_argv(tiny_model_dir, toy_csvs, out, rounds=20), wait_for, log)
    if when == "round 1":
        assert any("ray" in p.name() or "raylet" in p.name() or "gcs" in p.name() for p in started), [p.name() for p in started]

    process.send_signal(sent)
    began = time.monotonic()
    process.wait(timeout=300)

    assert process.returncode == code
    assert time.monotonic() - began < 120  # "within seconds": about 5 s quiet; 120 s allows a fully loaded machine
    err = log.read_text()
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"interrupted {progress}") and "; resume with: " in last and last.endswith("--resume")
    assert "Traceback" not in err
    deadline = time.monotonic() + 60  # the run's reaper kills them once the run has exited
    while alive(started) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert alive(started) == []
