"""The command-line options every experiment shares, parsed once into a RunConfig and checked early.

Each entry point in ``sims/`` adds its own options (``--strategies``, ``--out``...) to this parser, so a
flag means the same in every script, and bad input stops with one line and exit code 2 before any
weights load.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import fields, replace

from fl.config import ConfigError, RunConfig
from fl.data import DataError, parse_partition_scheme
from fl.model import ModelError

INPUT_ERRORS = (ConfigError, DataError, ModelError)  # what a user can fix: printed as one line, exit code 2
QUICK = {"train_size": 240, "test_size": 160, "max_length": 32, "rounds": 2, "local_steps": 3}  # --quick: a smoke run


def run_options(description: str) -> argparse.ArgumentParser:
    """A parser with every data, model and training option of RunConfig, defaults taken from it."""
    defaults = RunConfig()
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    p.add_argument("--quick", action="store_true", help=f"small smoke run: {QUICK} unless given explicitly")
    return p


def add_spread_options(p: argparse.ArgumentParser, offsets: str) -> None:
    """--training-seeds and --device, for the scripts that train experts across seeds without Flower."""
    p.add_argument("--training-seeds", default=offsets, help="comma-separated offsets added to each expert's training seed")
    p.add_argument("--device", default="cpu", help="torch device for training and scoring: cpu, cuda, cuda:1...")


def check_device(name: str) -> None:
    """Refuse a device torch cannot parse or this machine lacks, before any weights load."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name}: expected a torch device such as cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: this machine has no CUDA device torch can use")


def parse_offsets(text: str) -> list[int]:
    """--training-seeds: distinct offsets added to each expert's training seed."""
    try:
        offsets = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        offsets = []
    if not offsets or len(set(offsets)) != len(offsets):
        raise ConfigError(f"--training-seeds '{text}': expected distinct integers separated by commas")
    return offsets


def build_config(args: argparse.Namespace, argv: Sequence[str]) -> RunConfig:
    """The parsed options as a validated RunConfig; with --quick, the quick values for options not given."""
    names = {f.name for f in fields(RunConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    if args.quick:
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in argv if a.startswith("--")}
        values.update({k: v for k, v in QUICK.items() if k not in given})
    config = replace(RunConfig(), **values).validate()
    parse_partition_scheme(config.partition)
    return config


def console_logging() -> None:
    """Progress lines with a clock, without the chatter of the HTTP and dataset libraries."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ["httpx", "urllib3", "datasets", "filelock", "alembic"]:  # alembic: Flower's state database, on import
        logging.getLogger(noisy).setLevel(logging.WARNING)
