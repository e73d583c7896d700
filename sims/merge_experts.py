"""Bring your own experts: can these checkpoints be merged into one model, and what does each way of doing it keep?

Loads two or more Hugging Face checkpoints as experts (a fedmerge model folder such as the bio-expert/ and
legal-expert/ that sims/bio_legal.py saves, a ...ForSequenceClassification checkpoint whose classifier becomes
its domain's head, or a plain encoder), prints a compatibility report, runs every requested weight merge the
report allows (each refused one is skipped with its reason), scores the output ensemble and, with --distill,
trains one student to match the ensemble on unlabelled text (FedDF). Writes results.json, results.md,
scores.png and one model folder per produced model to --out.

    python sims/bio_legal.py && python sims/merge_experts.py --experts runs/bio_legal/bio-expert runs/bio_legal/legal-expert --base default --distill
    python sims/merge_experts.py --experts BIO LEGAL --domains bio,legal --rules fedavg,ties,aligned --base default
    python sims/merge_experts.py --experts A B --vocab union --distill --student base --base default

Exit code 2, with one line, for bad input and when no single model can come out (every merge refused and no
--distill); exit 0 otherwise, skipped merges included.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fl.run.environment import configure

configure(sys.argv[1:])

from fl.experts.options import VOCAB_MODES  # noqa: E402
from fl.run.cli import add_rule_options, build_config, console_logging, input_checks, rule_settings, run_options, run_script  # noqa: E402
from fl.run.config import ConfigError  # noqa: E402

FEDERATED_ONLY = ("clients_per_domain", "clients_per_round", "partition", "init", "attack", "reply_timeout", "on_node_loss")  # no rounds run here
ADAPTER_OPTIONS = ("peft", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets")  # experts come as full model folders


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = run_options(__doc__.split("\n\n")[0])
    p.add_argument("--experts", nargs="+", required=True, metavar="FOLDER_OR_ID", help="the expert checkpoints (two or more)")
    p.add_argument("--domains", default="", help="comma-separated, the domain each expert serves in --experts order (bio+legal: both); default: bio, legal")
    p.add_argument("--base", default="", help="the experts' common base ('default' = the embedded MiniLM-L6): task vectors, distances, the base row")
    add_rule_options(p, "--rules", "fedavg,ties,aligned")
    p.add_argument("--vocab", default="first", choices=VOCAB_MODES, help="the merged model's vocabulary when the experts' differ: the first expert's, or the union (WordPiece only)")
    p.add_argument("--distill", action="store_true", help="also train one student to match the ensemble's logits on unlabelled text (FedDF)")
    p.add_argument("--distill-steps", type=int, default=0, help="distillation steps; 0 = rounds x local-steps (an expert's budget)")
    p.add_argument("--distill-temperature", type=float, default=2.0, help="softmax temperature of the distillation KL")
    p.add_argument("--distill-data", default="", help="unlabelled texts (.txt, one per line, or .csv/.jsonl with --text-column); default: the domains' training texts without labels")
    p.add_argument("--student", default="auto", help="what the student starts from: auto (best weight merge, else base, else first expert), merge, base, or an expert's folder")
    p.add_argument("--out", default="runs/merge_experts", help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    return p.parse_args(argv)


def parse_serves(text: str, experts: list[str], domains: list[str]) -> tuple[tuple[str, ...], ...]:
    """--domains: one entry per expert, each a domain or several joined by '+'; every domain served."""
    if not text:
        if len(experts) != len(domains):
            raise ConfigError(f"--experts: {len(experts)} experts and no --domains; expected --domains naming the domain of each (e.g. {','.join(domains)})")
        return tuple((d,) for d in domains)
    entries = [tuple(part.split("+")) for part in text.split(",")]
    if len(entries) != len(experts):
        raise ConfigError(f"--domains {text}: {len(entries)} entries for {len(experts)} experts; expected one per expert")
    unknown = sorted({d for entry in entries for d in entry} - set(domains))
    if unknown:
        raise ConfigError(f"--domains {text}: unknown domain {unknown[0]!r}; expected {', '.join(domains)}")
    unserved = [d for d in domains if not any(d in entry for entry in entries)]
    if unserved:
        raise ConfigError(f"--domains {text}: no expert serves {unserved[0]}; expected every domain ({', '.join(domains)}) served")
    return tuple(entries)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console_logging()

    from fl.data.sources import unlabelled_texts
    from fl.experts.loading import check_expert
    from fl.modeling.model import check_model
    from fl.run.domains import load_domains
    from fl.run.versions import package_versions
    from fl.studies.own_experts import STUDENTS, NothingToProduce, StudyOptions, run_study

    out = Path(args.out)
    with input_checks(NothingToProduce) as checks:  # the study itself refuses when no single model can come out
        federated = [f"--{k.replace('_', '-')}" for k in FEDERATED_ONLY if k in vars(args)]
        if federated:
            raise ConfigError(f"{federated[0]}: an option of federated rounds, which merge_experts.py does not run; expected it left out")
        adapters = [f"--{k.replace('_', '-')}" for k in ADAPTER_OPTIONS if k in vars(args)]
        if adapters:
            raise ConfigError(f"{adapters[0]}: merge_experts.py merges full model folders (it does not read LoRA adapter folders yet); expected it left out")
        config = build_config(args)
        if len(args.experts) < 2:
            raise ConfigError(f"--experts {' '.join(args.experts)}: one expert; expected two or more")
        serves = parse_serves(args.domains, args.experts, config.domains)
        resolved = [str(Path(r).resolve()) if Path(r).exists() else r for r in map(check_expert, args.experts)]
        repeated = next((e for i, (e, r) in enumerate(zip(args.experts, resolved)) if r in resolved[:i]), None)
        if repeated is not None:
            raise ConfigError(f"--experts: {repeated} is given more than once; expected each expert once")
        if args.base:
            check_model(args.base, config.max_length)
        rules = rule_settings(args)
        if args.distill_steps < 0 or not args.distill_temperature > 0:
            raise ConfigError(f"--distill-steps {args.distill_steps} / --distill-temperature {args.distill_temperature}: expected steps >= 0 and a temperature > 0")
        if args.student not in STUDENTS and args.student not in args.experts:
            raise ConfigError(f"--student {args.student}: expected auto, merge, base or one of --experts")
        if (out / "results.json").exists() and not args.overwrite:
            raise ConfigError(f"--out {out} already holds results.json; expected a new folder, or --overwrite")
        texts = unlabelled_texts(args.distill_data, config.text_column) if args.distill_data else ()
        data = load_domains(config)
        options = StudyOptions(
            tuple(args.experts), serves, args.base, args.vocab, args.distill,
            args.distill_steps or config.rounds * config.local_steps, args.distill_temperature, texts, args.student,
        )
        run_study(config, options, rules, data, out, package_versions())
    if checks.failed:
        return 2
    print(f"results written to {out}/ (results.md, results.json, scores.png, one model folder per produced model)")
    return 0


if __name__ == "__main__":
    run_script(main)
