"""The command-line options every experiment shares, parsed once into a RunConfig and checked early.

Each entry point in ``sims/`` adds its own options (``--strategies``, ``--out``...) to this parser, so a
flag means the same in every script, and bad input stops with one line and exit code 2 before any
weights load (``input_checks``). Nothing here imports torch or transformers: ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path

from fl.data.partitions import parse_partition_scheme
from fl.data.user_files import DataError
from fl.modeling.errors import ModelError
from fl.run.config import ConfigError, RunConfig
from strategies.options import OptionError
from strategies.rules import RULES, RuleSetting, check_adapters, inline_values, option_keys, parse_names, settings

INPUT_ERRORS = (OptionError, DataError, ModelError)  # what a user can fix: printed as one line, exit code 2
QUICK = {"train_size": 240, "test_size": 160, "max_length": 32, "rounds": 2, "local_steps": 3}  # --quick: a smoke run
RUN_CONFIG_FIELDS = frozenset(f.name for f in fields(RunConfig))
COMMAND = "fedmerge"  # the console command (pyproject.toml [project.scripts]); its subcommands run the sims/ scripts


def run_options(description: str, script_defaults: Mapping[str, object] | None = None) -> argparse.ArgumentParser:
    """A parser with every data, model and training option of RunConfig.

    Their defaults are RunConfig's, or the script's own (``script_defaults``, which it passes on to ``build_config``),
    shown in the help, but argparse is given none (SUPPRESS): the parsed namespace then holds exactly the options the
    user gave, abbreviations included, which --quick needs.
    """
    defaults = replace(RunConfig(), **(script_defaults or {}))
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    def option(flag: str, help: str = "", **kwargs: object) -> None:
        name = flag.removeprefix("--").replace("-", "_")
        shown = f"{help} (default: {getattr(defaults, name)})".strip()
        p.add_argument(flag, default=argparse.SUPPRESS, help=shown.replace("%", "%%"), **kwargs)

    option("--rounds", type=int)
    option("--local-steps", "optimizer steps per client per round", type=int)
    option("--clients-per-domain", type=int)
    option("--clients-per-round", "clients trained each round: all, a count K, or a fraction in (0, 1); drawn with --seed, every domain represented when K allows")
    option("--partition", "iid or dirichlet:ALPHA (within each domain)")
    option("--model", "Hugging Face id or local folder; 'default' = embedded MiniLM-L6")
    p.add_argument(
        "--domain", action="append", default=argparse.SUPPRESS, metavar="NAME=SOURCE[,text=COL][,label=COL][,group=COL]",
        help="one domain of the run, repeatable; SOURCE: an embedded name, a .csv/.jsonl/.json file or hf:<dataset>[@split]; "
        "COL: this domain's own columns (default: --text-column...). Without it: bio = --bio-data, legal = --legal-data",
    )
    option("--bio-data", "the two-domain shorthand: 'hpo', a .csv/.jsonl file, or hf:<dataset>[@split]")
    option("--legal-data", "the two-domain shorthand: 'licenses', a .csv/.jsonl file, or hf:<dataset>[@split]")
    option("--text-column")
    option("--label-column")
    option("--group-column", "rows sharing its value stay on one side of the train/test split (.csv/.jsonl/hf: data)")
    option("--train-size", "training examples per domain", type=int)
    option("--test-size", "test examples per domain", type=int)
    option("--max-length", "tokens per example", type=int)
    option("--batch-size", type=int)
    option("--lr", "encoder learning rate", type=float)
    option("--head-lr", type=float)
    option("--lr-schedule", "linear (10% warm-up, decay to 0 each round) or constant")
    option("--init", "shared, or permuted: each client starts from its own permutation of the base")
    option(
        "--attack",
        "simulated attackers, a measurement tool: scale:F:COUNT (send global + F*update), sign-flip[:F]:COUNT "
        "(global - F*update), noise:SIGMA:COUNT (trained + Gaussian noise), label-flip:COUNT (train on deranged labels); "
        "COUNT clients drawn with --seed attack, results.json names them",
    )
    option("--peft", "none (full fine-tuning), or lora: clients train and send LoRA adapters and their head; the base stays frozen")
    option("--lora-rank", "rank of every LoRA adapter", type=int)
    option("--lora-alpha", "LoRA's alpha: an adapter's update is alpha / rank x B A", type=float)
    option("--lora-dropout", "dropout on each adapter's input", type=float)
    option("--lora-targets", "comma-separated module names that get adapters; '' = the attention's query and value")
    option("--device", "torch device of training and scoring: cpu, cuda, cuda:1...; refused when this machine lacks it")
    option("--reply-timeout", "seconds a round waits for its replies (and for a lost node to come back)", type=float)
    option("--on-node-loss", "a client lost mid-run: fail the run naming it, or continue with the others")
    option("--seed", type=int)
    p.add_argument("--quick", action="store_true", help=f"small smoke run: {QUICK} unless given explicitly")
    return p


def add_rule_options(p: argparse.ArgumentParser, flag: str = "--strategies", default: str = "fedavg,fedprox") -> None:
    """`flag` (the rules to run, parsed into ``args.strategies``) and one flag per option of every merge rule, from
    the rules' own declarations."""
    p.add_argument(
        flag,
        dest="strategies",
        metavar=flag.removeprefix("--").upper(),
        default=default,
        help=f"comma-separated merge rules ({', '.join(RULES)}); a variant takes options inline: ties:density=0.1:lambda=2",
    )
    group = p.add_argument_group("merge-rule options", "each applies to its rule only (docs/merge-rules.md: table of rules)")
    for key, (_, option) in option_keys().items():
        shown = f"{option.help}; {option.range_text} (default: {option.default})".replace("%", "%%")
        if option.kind is bool:
            group.add_argument(f"--{key}", dest=key, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=shown)
        else:
            group.add_argument(f"--{key}", dest=key, default=argparse.SUPPRESS, metavar=option.kind.__name__.upper(), help=shown)


def build_config(args: argparse.Namespace, defaults: Mapping[str, object] | None = None) -> RunConfig:
    """The options given as a validated RunConfig; for options not given, the quick values with --quick, else the
    script's own `defaults`, else RunConfig's."""
    values = {k: v for k, v in vars(args).items() if k in RUN_CONFIG_FIELDS}
    if "domain" in vars(args):
        joined = [entry for entry in args.domain if ";" in entry]
        if joined:
            raise ConfigError(f"--domain {joined[0]}: ';' separates domains in a run config; give one --domain per domain")
        values["domain_data"] = "; ".join(args.domain)
    values = {**(defaults or {}), **(QUICK if args.quick else {}), **values}
    config = replace(RunConfig(), **values).validate()
    parse_partition_scheme(config.partition)
    return config


def rule_settings(args: argparse.Namespace) -> list[RuleSetting]:
    """The --strategies with their options; an option of a rule that is not selected is refused (a typo, or a
    forgotten strategy, would otherwise pass silently)."""
    entries = parse_names(args.strategies)
    selected = {inline_values(entry)[0].name for entry in entries}
    keys = option_keys()
    given = {k: v for k, v in vars(args).items() if k in keys}
    for key in given:
        rule = keys[key][0].name
        if rule not in selected:
            raise OptionError(f"--{key} is an option of {rule}, which --strategies {args.strategies} does not select")
    chosen = settings(entries, given)
    check_adapters(chosen, vars(args).get("peft", RunConfig().peft))
    return chosen


def add_spread_options(p: argparse.ArgumentParser, offsets: str) -> None:
    """--training-seeds, for the scripts that train experts across seeds without Flower (--device is run_options')."""
    p.add_argument("--training-seeds", default=offsets, help="comma-separated offsets added to each expert's training seed")


def parse_offsets(text: str) -> list[int]:
    """--training-seeds: distinct offsets added to each expert's training seed."""
    try:
        offsets = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        offsets = []
    if not offsets or len(set(offsets)) != len(offsets):
        raise ConfigError(f"--training-seeds '{text}': expected distinct integers separated by commas")
    return offsets


def console_logging() -> None:
    """Progress lines with a clock, without the chatter of the HTTP and dataset libraries, and without Flower's
    tracebacks (``TracebacksToLog``)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ["httpx", "urllib3", "datasets", "filelock", "alembic"]:  # alembic: Flower's state database, on import
        logging.getLogger(noisy).setLevel(logging.WARNING)
    flower = logging.getLogger("flwr")
    if not any(isinstance(f, TracebacksToLog) for f in flower.filters):
        flower.addFilter(TracebacksToLog())


@dataclass
class InputChecks:
    failed: bool = False  # an input error was reported: the entry point returns exit code 2


@contextmanager
def input_checks(*also: type[Exception]) -> Iterator[InputChecks]:
    """The one error handler of the entry points, around the checks of what the user gave (options, data, models).

    An error the user can fix (INPUT_ERRORS, and the script's own ``also``) is printed as one line, ``error: ...``,
    on stderr and ends the block with ``failed`` set; the script then returns 2::

        with input_checks() as checks:
            config = build_config(args)
        if checks.failed:
            return 2
    """
    checks = InputChecks()
    try:
        yield checks
    except (*INPUT_ERRORS, *also) as error:
        print(f"error: {error}", file=sys.stderr)
        checks.failed = True


RUN_FAILED = 3  # exit code of a run stopped after it started (a failed round, a refused reply, a lost node); 2 = bad input
FAILURE_LOG = "error.log"


class RunFailed(RuntimeError):
    """A run that started and could not finish for a reason outside the user's input: a client failed a round, a
    reply was refused, a node was lost. Reported as one line, exit code RUN_FAILED, the traceback in a log file."""


@dataclass
class FailureLog:
    folder: Path | None = None  # the run's --out, once the script knows it; else the system's temporary folder


failure_log = FailureLog()


def log_failures_in(folder: str | Path) -> None:
    """Where a failed run's traceback goes: the run's output folder (each script calls this with its --out)."""
    failure_log.folder = Path(folder)


def failure_log_path() -> Path:
    folder = failure_log.folder if failure_log.folder is not None and failure_log.folder.is_dir() else Path(tempfile.gettempdir())
    return folder / FAILURE_LOG


def append_to_failure_log(text: str) -> Path:
    path = failure_log_path()
    with path.open("a") as log_file:
        log_file.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')}\n{text.rstrip()}\n")
    return path


class TracebacksToLog(logging.Filter):
    """Flower logs a client's or an actor's traceback as an ERROR record (40 lines on the terminal for a failure
    that fedmerge reports in one): such records go to the run's error.log instead, their last line stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "Traceback (most recent call last)" not in text:
            return True
        path = append_to_failure_log(text)
        last = text.strip().splitlines()[-1]
        record.msg, record.args = f"{last} (traceback in {path})", ()
        return True


def reported(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """An entry point's exit code; a RunFailed becomes one line on stderr, exit code RUN_FAILED, and its full
    traceback in error.log of the run's folder."""
    try:
        return main(argv)
    except RunFailed as error:
        path = append_to_failure_log("".join(traceback.format_exception(error)))
        print(f"error: {error} (traceback in {path})", file=sys.stderr)
        return RUN_FAILED


def timed(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """An entry point's exit code (``reported``), its wall time printed when it succeeded."""
    started = time.monotonic()
    code = reported(main, argv)
    if code == 0:
        print(f"total wall time {time.monotonic() - started:.0f} s")
    return code


def run_script(main: Callable[[list[str] | None], int]) -> None:
    """A sims/ script's `if __name__ == "__main__"`: run it, print its wall time when it succeeded, exit with its code."""
    sys.exit(timed(main))


def invoked_as(script: str) -> list[str]:
    """The command the user typed to start an entry point, for a command line printed back to them: ``fedmerge
    COMMAND`` when the fedmerge command runs it (sims/fedmerge.py puts that in sys.argv[0]), else ``python SCRIPT``."""
    return shlex.split(sys.argv[0]) if sys.argv[0].startswith(f"{COMMAND} ") else ["python", script]


def resume_command_of(script: str, argv: list[str], out: str) -> str:
    """A run's command line with --resume (and without --overwrite): what continues it."""
    kept = [a for a in argv if a not in ("--resume", "--overwrite")]
    has_out = any(a == "--out" or a.startswith("--out=") for a in kept)
    return shlex.join([*invoked_as(script), *kept, *([] if has_out else ["--out", out]), "--resume"])
