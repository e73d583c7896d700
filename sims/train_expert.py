"""Train one domain expert from any encoder, as sims/bio_legal.py trains its experts, and save it for merge_experts.py.

Linear-probe heads on the frozen --model for every domain, then rounds x local-steps fine-tuning steps on the
--expert domain only (LP-FT, the headline's recipe); the folder it writes (fedmerge's model folder) is valid --experts input.

    python sims/train_expert.py --expert legal --model runs/partners/all-mpnet-base-v2 --out runs/experts/legal-mpnet
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fl.run.environment import configure

configure(sys.argv[1:])

from fl.run.cli import build_config, console_logging, input_checks, run_options, run_script  # noqa: E402
from fl.run.config import ConfigError  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = run_options(__doc__.split("\n\n")[0])
    p.add_argument("--expert", required=True, metavar="DOMAIN", help="the domain whose expert is trained (one of the run's domains: bio, legal or those of --domain)")
    p.add_argument("--out", required=True, help="the expert's folder")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console_logging()

    from fl.modeling.folder import save_merged
    from fl.modeling.model import check_model
    from fl.run import seeds
    from fl.run.domains import load_domains
    from fl.run.phases import PhaseClock
    from fl.studies.baselines import fine_tune, fit_base, make_workbench

    with input_checks() as checks:
        config = build_config(args)
        if args.expert not in config.domains:
            raise ConfigError(f"--expert {args.expert}: expected one of {', '.join(config.domains)}")
        if (Path(args.out) / "config.json").exists():
            raise ConfigError(f"--out {args.out} already holds a model; expected a new folder")
        model_path = check_model(config.model, config.max_length)
        data = load_domains(config)
    if checks.failed:
        return 2
    clock = PhaseClock()
    steps = config.rounds * config.local_steps
    with clock.phase("tokenise and load model"):
        workbench = make_workbench(config, model_path, data)
    with clock.phase("linear probes on the frozen encoder"):
        start, _ = fit_base(workbench)
    with clock.phase(f"{args.expert} expert ({steps} steps)"):
        index = config.domains.index(args.expert)
        expert = fine_tune(workbench, start, [args.expert], steps, seeds.expert_training(config.seed, index), f"{args.expert} expert")
    workbench.model.load_state_dict(expert)
    save_merged(workbench.model, workbench.tokenizer, args.out, workbench.label_names)
    print(f"expert written to {args.out}/ ({', '.join(f'{k} {v:.0f} s' for k, v in clock.seconds.items())})")
    return 0


if __name__ == "__main__":
    run_script(main)
