"""sims/expert_sweep.py: a grid of settings x training seeds, on a tiny random model and toy CSVs."""

import json
from pathlib import Path

import pytest

from sims import expert_sweep


@pytest.mark.parametrize(
    ("grid", "device", "expected"),
    [
        ([{"learning_rate": 1e-4}], "cpu", "unknown option 'learning_rate'"),
        ([{"lr": -1.0}], "cpu", "--lr -1.0"),
        ([{}], "gpu0", "--device gpu0"),
    ],
)
def test_bad_grid_or_device_fails_with_one_line_and_exit_2(
    grid: list, device: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(grid))

    code = expert_sweep.main(["--grid", str(path), "--device", device, "--model", str(tmp_path / "no-model"), "--out", str(tmp_path)])

    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and expected in err
    assert not (tmp_path / "expert_sweep.jsonl").exists()  # nothing ran


def test_each_setting_and_training_seed_is_one_job_and_the_table_counts_them(
    tiny_model_dir: Path, toy_csvs: tuple[Path, Path], tmp_path: Path
) -> None:
    bio, legal = toy_csvs
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps([{}, {"lr": 3e-2}, {"train_size": 40}]))
    argv = [
        "--model", str(tiny_model_dir), "--bio-data", str(bio), "--legal-data", str(legal), "--train-size", "60",
        "--test-size", "24", "--max-length", "16", "--rounds", "1", "--local-steps", "4", "--lr", "1e-2",
        "--training-seeds", "0,1000", "--grid", str(grid), "--out", str(tmp_path),
    ]  # fmt: skip

    assert expert_sweep.main(argv) == 0

    jobs = [json.loads(line) for line in (tmp_path / "expert_sweep.jsonl").read_text().splitlines()]
    assert [(j["setting"], j["offset"]) for j in jobs] == [
        (s, o) for s in ["as given", "lr 0.03", "train-size 40"] for o in [0, 1000]
    ]
    base = {j["setting"]: j["accuracy"]["base"] for j in jobs}
    assert all(j["accuracy"]["base"] == base[j["setting"]] for j in jobs)  # probes fitted once per data setting
    assert jobs[0]["accuracy"]["bio-expert"] != jobs[2]["accuracy"]["bio-expert"]  # the lr change reached training
    assert jobs[4]["config"]["train-size"] == 40
    table = (tmp_path / "expert_sweep.md").read_text()
    for setting in base:
        runs = [j for j in jobs if j["setting"] == setting]
        holds = sum(all(e["holds"] for e in r["effects"][:4]) for r in runs)
        row = next(line for line in table.splitlines() if line.startswith(f"| {setting} |"))
        assert f"| {holds}/2 | 1.00 |" in row
