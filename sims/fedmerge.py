"""The fedmerge command: each sims/ script as a subcommand, once the project is installed (pip install -e .).

    fedmerge run --quick                 # python sims/bio_legal.py --quick
    fedmerge merge-experts --experts runs/bio_legal/bio-expert runs/bio_legal/legal-expert --base default
    fedmerge COMMAND --help              # the options of one command

A command hands the rest of the command line to its script's main() and exits with its code; the script is
imported only when its command runs, so ``fedmerge --help`` loads no model library.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path

from fl.run.cli import COMMAND, reported, timed


@dataclass(frozen=True)
class Script:
    module: str  # under sims/; its docstring's first line is the command's help
    timed: bool = True  # prints its wall time on success, as its own `__main__` does (run_script); not a printed table

    @property
    def summary(self) -> str:
        path = Path(__file__).with_name(f"{self.module}.py")
        return (ast.get_docstring(ast.parse(path.read_text())) or "").splitlines()[0]


COMMANDS = {
    "run": Script("bio_legal"),
    "many-domains": Script("many_domains"),
    "merge-experts": Script("merge_experts"),
    "train-expert": Script("train_expert"),
    "expert-check": Script("expert_check"),
    "expert-sweep": Script("expert_sweep"),
    "barrier": Script("barrier", timed=False),
    "robustness-table": Script("robustness_table", timed=False),
    "prepare-partners": Script("prepare_partners"),
}


def commands_parser() -> argparse.ArgumentParser:
    listed = "\n".join(f"  {name:18s}{script.summary}" for name, script in COMMANDS.items())
    p = argparse.ArgumentParser(
        prog=COMMAND,
        description=__doc__.split("\n\n")[0],
        epilog=f"commands:\n{listed}\n\n'{COMMAND} COMMAND --help' lists the options of one.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("command", choices=COMMANDS, metavar="COMMAND", help="the script to run, listed below")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    name = commands_parser().parse_args(argv[:1]).command
    script, rest = COMMANDS[name], argv[1:]
    # The script reads its command line on import (fl.run.environment.configure) and shows sys.argv[0] as its name
    # in usage lines and in the command it prints to resume a run (fl.run.cli.invoked_as).
    sys.argv = [f"{COMMAND} {name}", *rest]
    main_of = importlib.import_module(f"sims.{script.module}").main
    return timed(main_of, rest) if script.timed else reported(main_of, rest)


if __name__ == "__main__":
    sys.exit(main())
