"""Do the experts specialise and forget on this data, whatever the training seed?

Fits the base probes once, then trains both experts (rounds x local-steps steps, as in bio_legal.py)
once per training seed, scores each on both domains, merges them once (one-shot average), and reports
in how many training seeds each effect of the headline holds beyond noise. The data split and the
probes stay fixed (``--seed``); only batch order and dropout change. A few minutes per training seed
on the embedded default, against the headline's 11-12 for one: check this before trusting one table.

    python sims/expert_check.py                                   # training seeds 0, 1000, 2000
    python sims/expert_check.py --training-seeds 0,1000,2000,3000 --out runs/expert_check
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fl.run.environment import configure

configure(sys.argv[1:])

from fl.run.cli import add_spread_options, build_config, console_logging, input_checks, parse_offsets, run_options, run_script  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = run_options(__doc__.split("\n\n")[0])
    add_spread_options(p, "0,1000,2000")
    p.add_argument("--out", default="runs/expert_check", help="output folder (expert_check.json, expert_check.md)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console_logging()
    from fl.modeling.model import check_model
    from fl.run import seeds
    from fl.run.domains import load_domains
    from fl.studies.baselines import fit_base, make_workbench, scored_experts

    with input_checks() as checks:
        config = build_config(args)
        offsets = parse_offsets(args.training_seeds)
        model_path = check_model(config.model, config.max_length)
        data = load_domains(config)
    if checks.failed:
        return 2

    from fl.federation.permuted_init import client_start
    from fl.run.files import write_results
    from fl.studies.experiment import scores_json
    from fl.studies.report import effects, effects_json, spread_markdown

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workbench = make_workbench(config, str(model_path), data)
    start, base = fit_base(workbench)
    starts = {d: client_start(config, start, i * config.clients_per_domain) for i, d in enumerate(config.domains)}
    runs, spread = [], {}
    for k, offset in enumerate(offsets, 1):
        logging.info("== training seeds +%d (%d of %d)", offset, k, len(offsets))
        models = scored_experts(workbench, start, base, config.seed + offset, starts)
        spread[f"+{offset}"] = found = effects(models, config.domains, ["one-shot-average"], config.seed)
        runs.append(
            {
                "training-seed-offset": offset,
                "expert-seeds": {d: seeds.expert_training(config.seed + offset, i) for i, d in enumerate(config.domains)},
                "scores": {n: scores_json(s) for n, s in models.items()},
                "effects": effects_json(found),
            }
        )
    header = f"# Experts across training seeds: {config.rounds * config.local_steps} steps each, data seed {config.seed}"
    (out / "expert_check.md").write_text(spread_markdown(header, spread))
    write_results(out / "expert_check.json", {"config": config.to_record(), "device": config.device, "runs": runs})
    print((out / "expert_check.md").read_text())
    return 0


if __name__ == "__main__":
    run_script(main)
