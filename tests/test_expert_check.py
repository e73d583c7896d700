"""sims/expert_check.py: experts across training seeds, on a tiny random model and toy CSVs."""

import json
from pathlib import Path

import pytest

from fl.studies.report import Effect, spread_markdown
from sims import expert_check


def test_spread_counts_in_how_many_runs_each_effect_holds() -> None:
    runs = {
        "+0": [Effect("a", (0.05, 0.01, 0.09)), Effect("b", (0.02, -0.01, 0.05))],
        "+1000": [Effect("a", (0.04, 0.02, 0.06)), Effect("b", (0.03, 0.01, 0.05))],
        "+2000": [Effect("a", (0.01, -0.02, 0.04)), Effect("b", (-0.01, -0.03, 0.01))],
    }

    table = spread_markdown("# t", runs)

    assert "| a | 5.0 [1.0, 9.0] * | 4.0 [2.0, 6.0] * | 1.0 [-2.0, 4.0] | 2 of 3 |" in table
    assert "| b | 2.0 [-1.0, 5.0] | 3.0 [1.0, 5.0] * | -1.0 [-3.0, 1.0] | 1 of 3 |" in table


@pytest.mark.parametrize("seeds", ["", "0,x", "0,0"])
def test_bad_training_seeds_fail_with_one_line_and_exit_2(seeds: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = expert_check.main(["--training-seeds", seeds, "--bio-data", "/nonexistent.csv"])

    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and f"--training-seeds '{seeds}'" in err


def test_each_training_seed_trains_its_own_experts(tiny_model_dir: Path, toy_csvs: tuple[Path, Path], tmp_path: Path) -> None:
    bio, legal = toy_csvs
    argv = [
        "--model", str(tiny_model_dir), "--bio-data", str(bio), "--legal-data", str(legal), "--train-size", "60",
        "--test-size", "24", "--max-length", "16", "--rounds", "1", "--local-steps", "4", "--lr", "1e-2",
        "--seed", "3", "--training-seeds", "0,1000", "--out", str(tmp_path),
    ]  # fmt: skip

    assert expert_check.main(argv) == 0

    result = json.loads((tmp_path / "expert_check.json").read_text())
    runs = result["runs"]
    assert [r["expert-seeds"] for r in runs] == [{"bio": 104, "legal": 205}, {"bio": 1104, "legal": 1205}]
    assert runs[0]["scores"]["base"] == runs[1]["scores"]["base"]  # probes and split are fixed
    assert runs[0]["scores"]["bio-expert"] != runs[1]["scores"]["bio-expert"]  # only the training seed changed
    rows = {line.split(" | ")[0].lstrip("| "): line for line in (tmp_path / "expert_check.md").read_text().splitlines()}
    for claim_index, effect in enumerate(runs[0]["effects"]):
        holds = sum(r["effects"][claim_index]["holds"] for r in runs)
        assert rows[effect["claim"]].endswith(f"| {holds} of 2 |")
