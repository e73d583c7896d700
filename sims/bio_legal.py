"""Headline experiment: merge a biomedical and a legal fine-tune of one encoder by federated aggregation.

Runs the baselines (base probe, each expert, multi-task, one-shot average, ensemble) and each
strategy as a Flower simulation with one or more clients per domain, then writes results.json,
results.md, curves.png and one merged-model folder per strategy to --out.

    python sims/bio_legal.py              # embedded default (MiniLM-L6, HPO vs licences), ~15 min on 2 cores
    python sims/bio_legal.py --quick      # a small smoke run, ~3 min
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fl.environment import configure  # noqa: E402

configure(sys.argv[1:])

from fl.config import ConfigError, RunConfig  # noqa: E402
from fl.data import DataError, parse_partition_scheme  # noqa: E402
from fl.model import ModelError, check_model  # noqa: E402

QUICK = {"train_size": 240, "test_size": 160, "max_length": 32, "rounds": 2, "local_steps": 3}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = RunConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--strategies", default="fedavg,fedprox", help="comma-separated: fedavg, fedprox, aligned")
    p.add_argument("--rounds", type=int, default=defaults.rounds)
    p.add_argument("--local-steps", type=int, default=defaults.local_steps, help="optimizer steps per client per round")
    p.add_argument("--clients-per-domain", type=int, default=defaults.clients_per_domain)
    p.add_argument("--partition", default=defaults.partition, help="iid or dirichlet:ALPHA (within each domain)")
    p.add_argument("--model", default=defaults.model, help="Hugging Face id or local folder; 'default' = embedded MiniLM-L6")
    p.add_argument("--bio-data", default=defaults.bio_data, help="'hpo', a .csv/.jsonl file, or hf:<dataset>[@split]")
    p.add_argument("--legal-data", default=defaults.legal_data, help="'licenses', a .csv/.jsonl file, or hf:<dataset>[@split]")
    p.add_argument("--text-column", default=defaults.text_column)
    p.add_argument("--label-column", default=defaults.label_column)
    p.add_argument("--train-size", type=int, default=defaults.train_size, help="training examples per domain")
    p.add_argument("--test-size", type=int, default=defaults.test_size, help="test examples per domain")
    p.add_argument("--max-length", type=int, default=defaults.max_length, help="tokens per example")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr, help="encoder learning rate")
    p.add_argument("--head-lr", type=float, default=defaults.head_lr)
    p.add_argument("--lr-schedule", default=defaults.lr_schedule, help="linear (10%% warm-up, decay to 0 each round) or constant")
    p.add_argument("--proximal-mu", type=float, default=defaults.proximal_mu, help="FedProx mu")
    p.add_argument("--init", default=defaults.init, help="shared, or permuted: each client starts from its own permutation of the base")
    p.add_argument(
        "--align-residual",
        action=argparse.BooleanOptionalAction,
        default=defaults.align_residual,
        help="the aligned strategy also permutes the residual stream",
    )
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--out", default="runs/bio_legal", help="output folder")
    p.add_argument("--quick", action="store_true", help=f"small smoke run: {QUICK} unless given explicitly")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace, argv: list[str]) -> RunConfig:
    names = {f.name for f in fields(RunConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    if args.quick:
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in argv if a.startswith("--")}
        values.update({k: v for k, v in QUICK.items() if k not in given})
    return replace(RunConfig(), **values).validate()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ["httpx", "urllib3", "datasets", "filelock"]:
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from fl.baselines import load_data
    from fl.capacity import check_fits
    from strategies.flower import STRATEGIES

    try:
        config = build_config(args, argv)
        strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
        unknown = [s for s in strategies if s not in STRATEGIES]
        if unknown or not strategies:
            raise ConfigError(f"unknown strategy '{','.join(unknown)}': expected some of {', '.join(STRATEGIES)}")
        parse_partition_scheme(config.partition)
        model_path = check_model(config.model)
        check_fits(config, str(model_path))  # too many clients for this machine's memory: refuse now, not mid-round
        data = load_data(config)
    except (ConfigError, DataError, ModelError) as error:
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
