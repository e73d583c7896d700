"""Headline experiment: merge a biomedical and a legal fine-tune of one encoder by federated aggregation.

Runs the baselines (base probe, each expert, multi-task, one-shot merges of the experts, ensemble) and each
strategy as a Flower simulation with one or more clients per domain, then writes results.json, results.md,
curves.png and one merged-model folder per strategy to --out.

    python sims/bio_legal.py              # embedded default (MiniLM-L6, HPO vs licences), 7-12 min on 2 cores
    python sims/bio_legal.py --quick      # a small smoke run, about 1.5 min
    python sims/bio_legal.py --strategies fedavg,ties,regmean --ties-density 0.1
    python sims/bio_legal.py --repair distill:80   # then distil the experts into each strategy's model (FedDF)
    python sims/bio_legal.py --resume --out runs/bio_legal   # continue an interrupted run from its last round
    python sims/bio_legal.py --ray-address HEAD:6379 --client-cpus 4   # clients on a running Ray cluster (docs/scale-out.md)
    fedmerge run --quick                  # any of these, once installed (pip install -e .): fedmerge run = this script

Every completed round is checkpointed in --out; Ctrl-C or SIGTERM stops within seconds and prints the command
that resumes. A folder that already holds results is never overwritten without --overwrite.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from fl.run.environment import configure

configure(sys.argv[1:])

from fl.run.cli import add_rule_options, build_config, console_logging, input_checks, log_failures_in, resume_command_of, rule_settings, run_options, run_script  # noqa: E402
from fl.run.config import RunConfig  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = run_options(__doc__.split("\n\n")[0])
    add_rule_options(p)
    p.add_argument("--out", default="runs/bio_legal", help="output folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last completed round")
    p.add_argument("--overwrite", action="store_true", help="replace the results and checkpoints already in --out")
    p.add_argument(
        "--ray-address", default="", metavar="HOST:PORT",
        help="a running Ray cluster to run the clients on, from one of its nodes (docs/scale-out.md) "
        "(default %(default)r: RAY_ADDRESS if set, else a local Ray)",
    )
    p.add_argument(
        "--client-cpus", type=int, default=0, metavar="N",
        help="CPUs (and torch threads) each client reserves; 0 = this machine's cores split among the clients",
    )
    p.add_argument(
        "--repair", default="", metavar="distill:STEPS",
        help="after the rounds, distil the experts (each on its domain) into every strategy's model on the training texts "
        "without labels (FedDF); adds '<strategy>+distill' rows",
    )
    p.add_argument("--client-gpus", type=float, default=0.0, metavar="SHARE", help="GPU share each client reserves, e.g. 0.25 = four clients per GPU (default with --device cuda: 1/min(clients per round, 4))")
    return p.parse_args(argv)


def gpu_share(config: RunConfig) -> float:
    """The GPU share of each client with --device cuda and no --client-gpus: up to four clients on one GPU."""
    return 0.0 if config.device == "cpu" else 1.0 / min(config.sampled_clients, 4)


resume_command = functools.partial(resume_command_of, "sims/bio_legal.py")  # this run's command line with --resume


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console_logging()

    from fl.federation.capacity import check_fits
    from fl.federation.simulation import SimulationResources, check_resources, run_strategy
    from fl.modeling.lora import check_lora
    from fl.modeling.model import check_model
    from fl.run.checkpoint import RunFolder, check_out, run_identity
    from fl.run.domains import load_domains
    from fl.studies.repair import parse_repair

    with input_checks() as checks:
        config = build_config(args)
        strategies = rule_settings(args)
        repair_steps = parse_repair(args.repair)
        resources = SimulationResources(args.ray_address, args.client_cpus, args.client_gpus or gpu_share(config))
        identity = run_identity(config, strategies)
        check_out(Path(args.out), identity, args.resume, args.overwrite)
        check_resources(resources, config.num_clients)  # the cluster is reachable and can host a client (a GPU if asked)
        model_path = check_model(config.model, config.max_length)
        check_lora(config.lora_settings(), model_path)
        statistics = tuple(s.rule.statistic.name for s in strategies if s.rule.statistic)
        streamed = all(s.rule.streams for s in strategies)
        cluster = resources.cluster_address() is not None
        check_fits(config, str(model_path), statistics=statistics, streamed=streamed, client_cpus=resources.cpus_per_client, cluster=cluster)  # too many clients for this machine: refuse now
        data = load_domains(config)
    if checks.failed:
        return 2

    from fl.run.interrupt import exit_cleanly_on_signals
    from fl.run.versions import package_versions
    from fl.studies.experiment import run_experiment

    folder = RunFolder(Path(args.out), identity)
    with exit_cleanly_on_signals(folder.progress, resume_command(sys.argv[1:] if argv is None else argv, args.out)):
        folder.open(overwrite=args.overwrite)
        log_failures_in(args.out)
        run_experiment(config, model_path, data, strategies, folder, package_versions(), functools.partial(run_strategy, resources=resources), repair_steps)
    print(f"results written to {args.out}/ (results.md, results.json, curves.png, one model folder per strategy)")
    return 0


if __name__ == "__main__":
    run_script(main)
