"""Bad input to the headline CLI: one line naming the value, exit code 2, before any model is loaded."""

from pathlib import Path

import pytest

from fl.cli import build_config
from sims import bio_legal


@pytest.fixture
def no_model_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to load weights or train fails the test: errors must come first."""

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a model was loaded before the input was validated")

    monkeypatch.setattr("fl.model.AutoModel.from_pretrained", refuse)
    monkeypatch.setattr("fl.experiment.run_experiment", refuse, raising=False)


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = bio_legal.main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--strategies", "fedavg,bogus"], "bogus"),
        (["--rounds", "0"], "--rounds 0"),
        (["--bio-data", "/nonexistent/bio.csv"], "/nonexistent/bio.csv"),
        (["--partition", "dirichlet:-1"], "dirichlet:-1"),
    ],
)
def test_bad_options_fail_with_one_line_and_exit_2(argv, needle, capsys, no_model_loading) -> None:
    code, err = run_cli(argv, capsys)

    assert code == 2
    assert len(err.splitlines()) == 1 and needle in err


def test_csv_without_configured_columns(tmp_path: Path, capsys, no_model_loading) -> None:
    path = tmp_path / "bio.csv"
    path.write_text("sentence,category\nhello,a\nworld,b\n")

    code, err = run_cli(["--bio-data", str(path)], capsys)

    assert code == 2 and len(err.splitlines()) == 1 and "text" in err


def test_dataset_with_a_single_label(tmp_path: Path, capsys, no_model_loading) -> None:
    path = tmp_path / "legal.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n')

    code, err = run_cli(["--legal-data", str(path)], capsys)

    assert code == 2 and len(err.splitlines()) == 1 and "legal.jsonl" in err


def test_model_path_that_is_not_a_model(tmp_path: Path, capsys, no_model_loading) -> None:
    code, err = run_cli(["--model", str(tmp_path)], capsys)

    assert code == 2 and len(err.splitlines()) == 1 and str(tmp_path) in err


def test_a_federation_too_large_for_this_machines_memory(capsys, no_model_loading) -> None:
    code, err = run_cli(["--clients-per-domain", "400"], capsys)

    assert code == 2 and len(err.splitlines()) == 1
    assert "--clients-per-domain 400: 800 clients need about" in err and "clients fit" in err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--quick", "--local-st", "7"], {"local_steps": 7, "rounds": 2, "train_size": 240}),  # an abbreviation counts as given
        (["--quick", "--local-steps=9", "--rounds", "3"], {"local_steps": 9, "rounds": 3, "test_size": 160}),
        (["--local-st", "7"], {"local_steps": 7, "rounds": 4, "train_size": 2000}),
    ],
)
def test_quick_fills_only_the_options_not_given(argv: list[str], expected: dict[str, int]) -> None:
    config = build_config(bio_legal.parse_args(argv))

    assert {k: getattr(config, k) for k in expected} == expected


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--strategies", "fedavg", "--ties-density", "0.3"], "--ties-density is an option of ties, which --strategies fedavg does not select"),
        (["--strategies", "ties", "--ties-density", "0"], "ties-density 0: expected a number > 0 and <= 1"),
        (["--strategies", "fedprox", "--fedprox-mu", "nan"], "fedprox-mu nan: expected a number >= 0"),
        (["--strategies", "fedavg,fedavg"], "fedavg listed more than once"),
    ],
)
def test_bad_rule_options_fail_with_one_line_and_exit_2(argv, needle, capsys, no_model_loading) -> None:
    code, err = run_cli(argv, capsys)

    assert code == 2
    assert len(err.splitlines()) == 1 and needle in err


def test_rule_options_reach_the_experiment(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    seen = {}
    monkeypatch.setattr("fl.experiment.run_experiment", lambda config, path, data, strategies, *a, **k: seen.update(strategies=strategies))
    monkeypatch.setattr("fl.baselines.load_data", lambda config: {})

    code = bio_legal.main(["--quick", "--strategies", "ties,aligned", "--ties-dens", "0.4", "--no-aligned-residual", "--out", "/tmp/x"])

    assert code == 0
    assert [(s.name, dict(s.values)) for s in seen["strategies"]] == [("ties", {"density": 0.4, "lambda": 1.0}), ("aligned", {"residual": False})]
