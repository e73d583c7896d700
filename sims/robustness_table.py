"""One table of what each merge rule keeps under each attack, from the run folders of ``sims/bio_legal.py``.

Each folder is one run (one ``--attack`` setting, the same strategies); the table has a row per strategy and
attack, with each domain's accuracy and its 95% bootstrap interval, and names the attacking clients. The run
without an attack also gives each rule's cost against FedAvg (paired intervals, from its results.json).

    python sims/robustness_table.py runs/robustness/none runs/robustness/scale-1 --out docs/results/table.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def cell(values: list[float]) -> str:
    accuracy, low, high = values
    return f"{100 * accuracy:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def table(folders: list[Path]) -> str:
    runs = [json.loads((folder / "results.json").read_text()) for folder in folders]
    domains = list(runs[0]["domains"])
    lines = [
        "| attack | attackers | strategy | " + " | ".join(f"{d} accuracy" for d in domains) + " | mean |",
        "|---|---|---|" + "---|" * (len(domains) + 1),
    ]
    for run in runs:
        attack = run["attack"]["spec"] or "none"
        who = ", ".join(run["attack"]["clients"]) or "-"
        rows = {row["model"]: row for row in run["table"]}
        for name in run["strategies-run"]:
            row = rows[name]
            cells = [cell(row["per-domain"][d]) for d in domains]
            lines.append(f"| {attack} | {who} | {name} | " + " | ".join(cells) + f" | {cell(row['mean'])} |")
    calm = [run for run in runs if not run["attack"]["spec"]]
    if calm:
        lines += ["", "Without an attack, each rule against FedAvg (points, paired 95% interval):", ""]
        lines += ["| claim | difference | holds beyond noise |", "|---|---|---|"]
        for effect in calm[0]["against-fedavg"]:
            if " - fedavg on " in effect["claim"]:
                low, point, high = (100 * x for x in (effect["difference"][1], effect["difference"][0], effect["difference"][2]))
                lines.append(f"| {effect['claim']} | {point:+.1f} [{low:+.1f}, {high:+.1f}] | {effect['verdict']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", type=Path, help="run folders of sims/bio_legal.py, each with results.json")
    p.add_argument("--out", type=Path, help="write the table here (default: print it)")
    args = p.parse_args(argv)
    missing = [str(f) for f in args.folders if not (f / "results.json").is_file()]
    if missing:
        print(f"error: no results.json in {', '.join(missing)}: expected finished runs of sims/bio_legal.py", file=sys.stderr)
        return 2
    text = table(args.folders)
    if args.out:
        args.out.write_text(text)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
