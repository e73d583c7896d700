"""The headline CLI: --quick and the merge-rule options reach the config, the entry points' one error handler, the
resume line (bad input: tests/test_bad_inputs.py; the fedmerge command: tests/test_fedmerge.py)."""

from pathlib import Path

import pytest

from fl.run.cli import build_config, input_checks
from fl.run.config import ConfigError
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
    monkeypatch.setattr("fl.run.domains.load_domains", lambda config: {})

    code = bio_legal.main(["--quick", "--strategies", "ties,aligned", "--ties-dens", "0.4", "--no-aligned-residual", "--out", str(tmp_path / "out")])

    assert code == 0
    assert [(s.name, dict(s.values)) for s in seen["strategies"]] == [("ties", {"density": 0.4, "lambda": 1.0}), ("aligned", {"residual": False})]


def test_an_input_error_in_the_checks_is_one_line_and_marks_them_failed(capsys: pytest.CaptureFixture[str]) -> None:
    with input_checks() as checks:
        raise ConfigError("--rounds 0: expected an integer >= 1")

    assert checks.failed
    assert capsys.readouterr().err == "error: --rounds 0: expected an integer >= 1\n"


def test_a_scripts_own_error_counts_only_when_named_and_other_errors_pass_through(capsys: pytest.CaptureFixture[str]) -> None:
    class Refused(RuntimeError):
        pass

    with input_checks(Refused) as checks:
        raise Refused("nothing to produce")
    with pytest.raises(KeyError), input_checks():
        raise KeyError("a bug, not an input")
    with input_checks() as passed:
        pass

    assert checks.failed and not passed.failed
    assert capsys.readouterr().err == "error: nothing to produce\n"


@pytest.mark.parametrize(
    ("argv0", "expected"),
    [
        ("sims/bio_legal.py", "python sims/bio_legal.py --quick --out runs/x --resume"),
        ("fedmerge run", "fedmerge run --quick --out runs/x --resume"),  # what sims/fedmerge.py puts in sys.argv[0]
    ],
)
def test_the_resume_line_repeats_the_command_the_user_typed(monkeypatch: pytest.MonkeyPatch, argv0: str, expected: str) -> None:
    monkeypatch.setattr("sys.argv", [argv0, "--quick", "--overwrite"])

    assert bio_legal.resume_command(["--quick", "--overwrite"], "runs/x") == expected


def test_a_run_that_fails_after_it_started_prints_one_line_exits_3_and_logs_the_traceback(tmp_path: Path, capsys) -> None:
    from fl.federation.simulation import SimulationFailed
    from fl.run.cli import RUN_FAILED, failure_log, log_failures_in, timed

    def main(argv: list[str] | None) -> int:
        log_failures_in(tmp_path)
        raise SimulationFailed("strategy 'fedavg' failed: round 1 train: 1 of 2 clients failed: node 7 (bio-0): disk full")

    try:
        code = timed(main, [])
    finally:
        failure_log.folder = None

    err = capsys.readouterr().err.strip()
    assert code == RUN_FAILED == 3
    assert err == f"error: strategy 'fedavg' failed: round 1 train: 1 of 2 clients failed: node 7 (bio-0): disk full (traceback in {tmp_path / 'error.log'})"
    assert "Traceback (most recent call last)" in (tmp_path / "error.log").read_text()


def test_the_reply_timeout_and_the_node_loss_policy_are_flags_of_the_scripts_that_run_rounds() -> None:
    from fl.run.cli import build_config, run_options

    config = build_config(run_options("test").parse_args(["--reply-timeout", "20", "--on-node-loss", "continue"]))

    assert (config.reply_timeout, config.on_node_loss) == (20.0, "continue")
