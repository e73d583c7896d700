"""Smoke test of bench/: each script starts on its smallest size and prints one valid JSON object.

The four scripts run at the same time (most of their time is start-up: imports, Ray, worker processes), each
in its own subprocess with a timeout; each test then checks its script's output.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("aggregate.py", "align.py", "overhead.py", "scale.py")
TIMEOUT_S = 1800  # a guard against a hung script only: a busy machine may take many times the quiet time
EXTRA = {"scale.py": ["--timeout", "1500", "--budget", "1600"]}  # its case's own time limit is sized for a quiet machine


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    folder = tmp_path_factory.mktemp("bench")
    started = {}
    for script in SCRIPTS:
        out = folder / script.replace(".py", ".json")
        command = [sys.executable, str(ROOT / "bench" / script), "--small", "--out", str(out), *EXTRA.get(script, [])]
        started[script] = (subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), out)
    done = {}
    for script, (process, out) in started.items():
        try:
            stdout, stderr = process.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        done[script] = (subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), out)
    return done


def result_of(smoke_runs: dict, script: str) -> dict:
    completed, out = smoke_runs[script]
    assert completed.returncode == 0, f"{script} exited {completed.returncode}: {completed.stderr[-3000:]}"
    printed = json.loads(completed.stdout)
    assert printed == json.loads(out.read_text())
    return printed


def test_aggregate_prints_json_with_ours_matching_flower(smoke_runs) -> None:
    result = result_of(smoke_runs, "aggregate.py")

    (case,) = result["cases"]
    assert case["clients"] == 2
    assert case["max_abs_diff_ours_vs_flower"] < 1e-5


def test_align_prints_json_and_recovers_the_planted_permutation(smoke_runs) -> None:
    result = result_of(smoke_runs, "align.py")

    assert result["ours_recovered"] is True


def test_overhead_prints_json_and_flower_trains_exactly_what_the_bare_loop_trains(smoke_runs) -> None:
    result = result_of(smoke_runs, "overhead.py")

    assert result["final_weights_max_abs_diff"]["flower vs bare-parallel"] == 0.0
    assert result["ratios"]["flower / bare-parallel"] > 0
    assert {"bare-parallel", "flower", "bare-sequential"} == set(result["regimes"])


def test_scale_prints_json_with_one_finished_case(smoke_runs) -> None:
    result = result_of(smoke_runs, "scale.py")

    (case,) = result["cases"]
    assert case["exit_code"] == 0, case.get("error")
    assert case["replies_per_round"] == [2]
    assert case["peak_pss_gib"] > 0


def test_capacity_check_refuses_a_federation_that_cannot_fit_with_one_line() -> None:
    from dataclasses import replace

    from fl.federation.capacity import CapacityError, check_fits
    from fl.modeling.model import default_model_path
    from fl.run.config import RunConfig

    config = replace(RunConfig(), clients_per_domain=500)

    with pytest.raises(CapacityError, match=r"^--clients-per-domain 500: 1000 clients need about [\d.]+ GiB") as error:
        check_fits(config, str(default_model_path()), available=16 * 2**30)
    assert "\n" not in str(error.value)
    assert check_fits(replace(config, clients_per_domain=1), str(default_model_path()), available=16 * 2**30).num_clients == 2
    # the driver's memory follows the replies it holds at once, not the client count
    assert check_fits(config, str(default_model_path()), available=16 * 2**30, streamed=True).replies_held <= 3 + 2 + 16 + (os.cpu_count() or 1)
    assert check_fits(replace(config, clients_per_round="50"), str(default_model_path()), available=16 * 2**30).replies_held == 53
    with pytest.raises(CapacityError, match=r"^--clients-per-round 900: "):
        check_fits(replace(config, clients_per_round="900"), str(default_model_path()), available=16 * 2**30)


def test_replies_that_carry_statistics_are_counted_larger() -> None:
    from fl.federation.capacity import check_fits, model_bytes
    from fl.modeling.model import default_model_path
    from fl.run.config import RunConfig

    path = str(default_model_path())
    weights, fisher, gram = (model_bytes(path, s) for s in ("", "fisher", "gram"))

    assert fisher == 2 * weights and weights < gram < 2 * weights  # MiniLM: Grams are about 0.8 of the weights
    plain = check_fits(RunConfig(), path, available=16 * 2**30)
    assert check_fits(RunConfig(), path, available=16 * 2**30, statistics=("gram", "fisher")).model_bytes == fisher > plain.model_bytes
