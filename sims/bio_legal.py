"""Headline experiment: merge a biomedical and a legal fine-tune of one encoder by federated aggregation.

Runs the baselines (base probe, each expert, multi-task, one-shot average, ensemble) and each
strategy as a Flower simulation with one or more clients per domain, then writes results.json,
results.md, curves.png and one merged-model folder per strategy to --out.

    python sims/bio_legal.py              # embedded default (MiniLM-L6, HPO vs licences), 11-12 min on 2 cores
    python sims/bio_legal.py --quick      # a small smoke run, about 1.5 min
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fl.environment import configure  # noqa: E402

configure(sys.argv[1:])

from fl.cli import INPUT_ERRORS, build_config, console_logging, run_options  # noqa: E402
from fl.config import ConfigError  # noqa: E402
from fl.model import check_model  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = run_options(__doc__.split("\n\n")[0])
    p.add_argument("--strategies", default="fedavg,fedprox", help="comma-separated: fedavg, fedprox, aligned")
    p.add_argument("--out", default="runs/bio_legal", help="output folder")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    console_logging()

    from fl.baselines import load_data
    from fl.capacity import check_fits
    from strategies.flower import STRATEGIES

    try:
        config = build_config(args, argv)
        strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
        unknown = [s for s in strategies if s not in STRATEGIES]
        if unknown or not strategies:
            raise ConfigError(f"unknown strategy '{','.join(unknown)}': expected some of {', '.join(STRATEGIES)}")
        model_path = check_model(config.model)
        check_fits(config, str(model_path))  # too many clients for this machine's memory: refuse now, not mid-round
        data = load_data(config)
    except INPUT_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    from fl.experiment import run_experiment
    from fl.server_app import package_versions

    run_experiment(config, model_path, data, strategies, Path(args.out), package_versions())
    print(f"results written to {args.out}/ (results.md, results.json, curves.png, one model folder per strategy)")
    return 0


if __name__ == "__main__":
    started = time.monotonic()
    code = main()
    if code == 0:
        print(f"total wall time {time.monotonic() - started:.0f} s")
    sys.exit(code)
