"""The headline CLI: --quick and the merge-rule options reach the config (bad input: tests/test_bad_inputs.py)."""

from pathlib import Path

import pytest

from fl.run.cli import build_config
from sims import bio_legal


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--quick", "--local-st", "7"], {"local_steps": 7, "rounds": 2, "train_size": 240}),  # an abbreviation counts as given
        (["--quick", "--local-steps=9", "--rounds", "3"], {"local_steps": 9, "rounds": 3, "test_size": 160}),
        (["--local-st", "7"], {"local_steps": 7, "rounds": 4, "train_size": 2000}),
        (["--device", "cpu", "--quick"], {"device": "cpu", "rounds": 2}),
    ],
)
def test_quick_fills_only_the_options_not_given(argv: list[str], expected: dict[str, object]) -> None:
    config = build_config(bio_legal.parse_args(argv))

    assert {k: getattr(config, k) for k in expected} == expected


def test_rule_options_reach_the_experiment(monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path) -> None:
    seen = {}
    monkeypatch.setattr("fl.studies.experiment.run_experiment", lambda config, path, data, strategies, *a, **k: seen.update(strategies=strategies))
    monkeypatch.setattr("fl.studies.baselines.load_data", lambda config: {})

    code = bio_legal.main(["--quick", "--strategies", "ties,aligned", "--ties-dens", "0.4", "--no-aligned-residual", "--out", str(tmp_path / "out")])

    assert code == 0
    assert [(s.name, dict(s.values)) for s in seen["strategies"]] == [("ties", {"density": 0.4, "lambda": 1.0}), ("aligned", {"residual": False})]
