"""The fedmerge command and the scripts' --help: each command runs its script, and asking for help imports neither
torch nor transformers (each help is a fresh process: a test process has torch imported already)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from sims.fedmerge import COMMANDS

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers")
SCRIPTS = sorted(p.name for p in (REPO / "sims").glob("*.py") if p.name != "__init__.py")


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


def heavy_modules_after(run: str) -> str:
    """Python code that runs `run`, ignores its SystemExit, and prints which heavy libraries it imported last."""
    return f"import sys\ntry:\n    {run}\nexcept SystemExit:\n    pass\nprint('imported:', sorted(m for m in {HEAVY!r} if m in sys.modules))"


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_scripts_help_imports_no_model_library(script: str) -> None:
    run = f"import runpy; sys.argv = ['sims/{script}', '--help']; runpy.run_path('sims/{script}', run_name='__main__')"

    done = run_python(heavy_modules_after(run))

    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout and done.stdout.strip().endswith("imported: []"), done.stdout[-500:]


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["merge-experts", "--help"]])
def test_fedmerges_help_imports_no_model_library(argv: list[str]) -> None:
    run = f"from sims.fedmerge import main; sys.argv = ['fedmerge', *{argv!r}]; main()"

    done = run_python(heavy_modules_after(run))

    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("imported: []"), done.stdout[-500:]


def test_the_fedmerge_help_lists_every_command_with_its_scripts_summary() -> None:
    done = subprocess.run([sys.executable, "-m", "sims.fedmerge", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)

    assert done.returncode == 0, done.stderr
    for name in ("run", "merge-experts", "train-expert", "expert-check", "expert-sweep", "barrier", "robustness-table", "prepare-partners"):
        assert f"\n  {name} " in done.stdout, name
    assert "Headline experiment: merge a biomedical and a legal fine-tune" in done.stdout


def test_a_command_shows_its_scripts_options_under_its_own_name() -> None:
    done = subprocess.run([sys.executable, "-m", "sims.fedmerge", "run", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: fedmerge run ") and "--strategies" in done.stdout and "--ray-address" in done.stdout


def test_an_unknown_command_exits_2_naming_the_commands() -> None:
    done = subprocess.run([sys.executable, "-m", "sims.fedmerge", "simulate"], cwd=REPO, capture_output=True, text=True, timeout=120)

    assert done.returncode == 2
    assert "invalid choice: 'simulate'" in done.stderr and "merge-experts" in done.stderr


def test_a_command_returns_its_scripts_exit_code_and_message(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sims.fedmerge", "robustness-table", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120
    )

    assert done.returncode == 2
    assert done.stderr == f"error: no results.json in {tmp_path}: expected finished runs of sims/bio_legal.py\n"


@pytest.mark.parametrize(("model", "offline"), [("default", "1"), ("some-org/some-model", None)])
def test_the_script_configures_the_environment_from_the_commands_own_arguments(model: str, offline: str | None) -> None:
    code = (
        "import os, sys\nfrom sims.fedmerge import main\n"
        f"try:\n    main(['run', '--model', {model!r}, '--help'])\nexcept SystemExit:\n    pass\n"
        "print('offline:', os.environ.get('HF_HUB_OFFLINE'))"
    )

    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in __import__("os").environ.items() if not k.startswith("HF_")})

    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith(f"offline: {offline}")


def test_every_command_names_a_script_whose_wall_time_line_matches_its_own_main_block() -> None:
    for name, script in COMMANDS.items():
        tree = ast.parse((REPO / "sims" / f"{script.module}.py").read_text())
        calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}

        assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body), name
        assert ("run_script" in calls) == script.timed, f"{name}: timed={script.timed}, but its __main__ block says otherwise"
    assert set(SCRIPTS) - {f"{s.module}.py" for s in COMMANDS.values()} == {"fedmerge.py"}


def test_the_installed_console_command_runs() -> None:
    command = Path(sys.executable).with_name("fedmerge")
    if not command.is_file():
        pytest.skip("fedmerge is not installed in this environment (pip install -e .)")

    done = subprocess.run([str(command), "run", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: fedmerge run ")


def test_the_rule_registry_imports_without_torch_and_each_named_function_exists() -> None:
    code = (
        "import sys\nfrom strategies.rules import RULES\n"
        "print('imported:', sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
        "for rule in RULES.values():\n"
        "    assert callable(rule.function.resolve()), rule.name\n"
        "    if rule.statistic:\n"
        "        assert callable(rule.statistic.check.resolve()), rule.name\n"
        "print('resolved')"
    )

    done = run_python(code)

    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:2] == ["imported: []", "resolved"]
