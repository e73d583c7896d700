"""Which training settings make the headline's effects hold whatever the training seed? A grid search.

For every setting of a grid (changes to the run's options), fits the base probes once per data setting,
trains both experts (rounds x local-steps steps) once per training seed, merges them once and counts in
how many seeds each effect of the headline holds beyond noise, as sims/expert_check.py does for one
setting. Sized for a GPU: one setting with four training seeds takes ~14 minutes on the 2-core CPU; on one
H100 with --workers 8 the default grid ran at about 2.5 s per job (setting x training seed).

    python sims/expert_sweep.py --device cuda --workers 8 --out runs/sweep
    python sims/expert_sweep.py --grid my_grid.json --training-seeds 0,1000 --out runs/sweep   # JSON: [{"lr": 1e-4}, ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import fields, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from fl.run.environment import configure

configure(sys.argv[1:])

from fl.run.cli import add_spread_options, build_config, console_logging, input_checks, parse_offsets, run_options, run_script  # noqa: E402
from fl.run.config import ConfigError, RunConfig  # noqa: E402

# Each entry changes the options given on the command line; ordered so that a --time-limit cut keeps the likeliest.
DEFAULT_GRID: list[dict[str, Any]] = [
    {},
    {"lr": 1e-4},
    {"lr": 3e-4},
    {"lr": 5e-4},
    {"train_size": 1000},
    {"train_size": 1000, "lr": 1e-4},
    {"train_size": 1000, "lr": 3e-4},
    {"train_size": 500},
    {"train_size": 500, "lr": 1e-4},
    {"max_length": 64},
    {"max_length": 64, "lr": 1e-4},
    {"max_length": 64, "lr": 3e-4},
    {"max_length": 16, "local_steps": 80},
    {"local_steps": 80},
    {"local_steps": 80, "lr": 1e-4},
    {"local_steps": 80, "lr": 3e-4},
    {"local_steps": 80, "train_size": 1000},
    {"batch_size": 32},
    {"batch_size": 32, "lr": 4e-4},
    {"batch_size": 8, "local_steps": 80},
    {"lr_schedule": "constant", "lr": 5e-5},
    {"lr_schedule": "constant", "lr": 1e-4},
    {"freeze_word_embeddings": False},
    {"freeze_word_embeddings": False, "lr": 3e-4},
    {"max_length": 64, "train_size": 1000},
    {"max_length": 64, "local_steps": 80},
    {"local_steps": 20},
    {"local_steps": 20, "lr": 4e-4},
    {"local_steps": 80, "lr": 5e-4},
    {"local_steps": 80, "train_size": 500},
    {"seed": 1},
    {"seed": 1, "train_size": 1000},
    {"seed": 1, "local_steps": 80},
    {"seed": 1, "max_length": 64},
]
EXPERT_CLAIMS = (
    "bio-expert beats base on bio",
    "legal-expert beats base on legal",
    "legal-expert loses bio",
    "bio-expert loses legal",
)
DATA_FIELDS = ("model", "domain_data", "bio_data", "legal_data", "text_column", "label_column", "group_column", "train_size", "test_size", "max_length", "seed", "device")  # a cached workbench holds its model on the device


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = run_options(__doc__.split("\n\n")[0])
    p.add_argument("--grid", help="JSON file: a list of objects, each changing some options (snake_case names)")
    add_spread_options(p, "0,1000,2000,3000")
    p.add_argument("--workers", type=int, default=1, help="processes sharing the device (a GPU is mostly idle with one)")
    p.add_argument("--time-limit", type=float, default=0.0, help="seconds after which no new job starts (0: none)")
    p.add_argument("--out", default="runs/expert_sweep", help="output folder (expert_sweep.jsonl, expert_sweep.md)")
    return p.parse_args(argv)


def load_grid(path: str | None) -> list[dict[str, Any]]:
    if path is None:
        return DEFAULT_GRID
    try:
        grid = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"--grid {path}: expected a readable JSON file ({error})") from None
    if not isinstance(grid, list) or not grid or not all(isinstance(g, dict) for g in grid):
        raise ConfigError(f"--grid {path}: expected a non-empty JSON list of objects")
    return grid


def settings(base: RunConfig, grid: Sequence[Mapping[str, Any]]) -> list[tuple[str, RunConfig]]:
    """Every grid entry applied to the base configuration, validated, with a name listing its changes."""
    known = {f.name for f in fields(RunConfig)}
    out = []
    for change in grid:
        unknown = sorted(set(change) - known)
        if unknown:
            raise ConfigError(f"grid entry {json.dumps(change)}: unknown option '{unknown[0]}'")
        try:
            config = replace(base, **{k: type(getattr(base, k))(v) for k, v in change.items()}).validate()
        except (TypeError, ValueError) as error:
            raise ConfigError(f"grid entry {json.dumps(change)}: {error}") from None
        name = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in change.items()) or "as given"
        out.append((name, config))
    return out


def relative_cost(config: RunConfig, reference: RunConfig) -> float:
    """Expert training cost against the reference, as steps x batch x tokens (an upper bound: batches pad to their longest)."""

    def work(c: RunConfig) -> int:
        return c.rounds * c.local_steps * c.batch_size * c.max_length

    return work(config) / work(reference)


_BENCHES: dict[tuple[Any, ...], Any] = {}  # per worker process: data setting -> (workbench, start state, base scores)


def run_job(config: RunConfig, model_path: str, offset: int, threads: int) -> dict[str, Any]:
    """Both experts of one setting and one training seed, scored; the base is cached per data setting."""
    import torch

    from fl.run.domains import load_domains
    from fl.studies.baselines import fit_base, make_workbench, scored_experts
    from fl.studies.report import effects, effects_json

    if threads:
        torch.set_num_threads(threads)
    key = tuple(getattr(config, f) for f in DATA_FIELDS)
    if key not in _BENCHES:
        workbench = make_workbench(config, model_path, load_domains(config))
        _BENCHES[key] = (workbench, *fit_base(workbench))
    workbench, start, base = _BENCHES[key]
    workbench.config = config
    tick = time.monotonic()
    models = scored_experts(workbench, start, base, config.seed + offset)
    return {
        "offset": offset,
        "seconds": time.monotonic() - tick,
        "accuracy": {n: {d: s.accuracy for d, s in scores.items()} for n, scores in models.items()},
        "effects": effects_json(effects(models, config.domains, ["one-shot-average"], config.seed)),
    }


def summary_markdown(results: Mapping[str, list[dict[str, Any]]], costs: Mapping[str, float], header: str) -> str:
    """One row per setting: base, each expert effect (mean difference, in how many seeds it holds), the merge."""
    cols = ["base bio / legal", *EXPERT_CLAIMS, "one-shot average between", "all four expert effects", "cost"]
    lines = [header, "", "| setting | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    ranked = sorted(results.items(), key=lambda kv: -sum(all_expert_effects(r) for r in kv[1]) / max(1, len(kv[1])))
    for name, runs in ranked:
        n = len(runs)
        if n == 0:
            continue
        base = runs[0]["accuracy"]["base"]
        cells = [f"{100 * base['bio']:.1f} / {100 * base['legal']:.1f}"]
        for claim in EXPERT_CLAIMS:
            found = [effect_of(r, claim) for r in runs]
            mean = 100 * sum(e["difference"][0] for e in found) / n
            cells.append(f"{mean:+.1f} ({sum(e['holds'] for e in found)}/{n})")
        between = sum(all(e["holds"] for e in r["effects"] if e["claim"].startswith("one-shot-average")) for r in runs)
        cells += [f"{between}/{n}", f"{sum(all_expert_effects(r) for r in runs)}/{n}", f"{costs[name]:.2f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Per expert effect: mean difference in points over the training seeds, (in how many it holds beyond noise:",
        "the paired 95% bootstrap interval over test examples above 0). 'one-shot average between': all four of its",
        "claims hold (above the forgetting expert, below the own expert, on both domains). cost: expert training work",
        "(steps x batch x tokens) relative to the options given; the CPU time of a headline run grows about with it.",
    ]
    return "\n".join(lines) + "\n"


def effect_of(run: Mapping[str, Any], claim: str) -> dict[str, Any]:
    return next(e for e in run["effects"] if e["claim"].startswith(claim))


def all_expert_effects(run: Mapping[str, Any]) -> bool:
    return all(effect_of(run, c)["holds"] for c in EXPERT_CLAIMS)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console_logging()
    from fl.modeling.model import check_model
    from fl.run.domains import load_domains

    with input_checks() as checks:
        base = build_config(args)
        offsets = parse_offsets(args.training_seeds)
        grid = settings(base, load_grid(args.grid))
        if args.workers < 1:
            raise ConfigError(f"--workers {args.workers}: expected an integer >= 1")
        model_path = check_model(base.model, max(config.max_length for _, config in grid))
        for config in {tuple(getattr(c, f) for f in DATA_FIELDS): c for _, c in grid}.values():
            load_domains(config)  # bad data fails here, before any training
    if checks.failed:
        return 2

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "expert_sweep.jsonl"
    log_path.write_text("")
    jobs = [(name, config, offset) for name, config in grid for offset in offsets]
    results: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in grid}
    started = time.monotonic()

    def record(name: str, config: RunConfig, result: dict[str, Any]) -> None:
        results[name].append(result)
        with log_path.open("a") as f:
            f.write(json.dumps({"setting": name, "config": config.to_record(), **result}) + "\n")
        finished = sum(map(len, results.values()))
        logging.info("done %s +%d (%.0f s): %d of %d jobs", name, result["offset"], result["seconds"], finished, len(jobs))

    def out_of_time() -> bool:
        return args.time_limit > 0 and time.monotonic() - started > args.time_limit

    failed: list[str] = []
    if args.workers == 1:
        for name, config, offset in jobs:
            if out_of_time():
                break
            record(name, config, run_job(config, model_path, offset, 0))
    else:
        threads = 2  # a GPU worker needs a thread to launch kernels and one for the tokenizer and probes
        pool = ProcessPoolExecutor(args.workers, mp_context=get_context("spawn"))
        pending: dict[Future[dict[str, Any]], tuple[str, RunConfig]] = {}
        queue = list(jobs)
        while queue or pending:
            while queue and len(pending) < 2 * args.workers and not out_of_time():
                name, config, offset = queue.pop(0)
                pending[pool.submit(run_job, config, model_path, offset, threads)] = (name, config)
            if out_of_time():
                queue.clear()
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                name, config = pending.pop(future)
                try:
                    record(name, config, future.result())
                except Exception as error:  # one failed job must not lose the others' results
                    failed.append(f"{name}: {error!r}")
                    logging.error("job failed: %s", failed[-1])
        pool.shutdown()

    costs = {name: relative_cost(config, base) for name, config in grid}
    finished = sum(map(len, results.values()))
    header = (
        f"# Expert effects across training seeds, per setting ({finished} of {len(jobs)} jobs, "
        f"training seeds +{', +'.join(map(str, offsets))}, data seed {base.seed}, device {base.device})"
    )
    (out / "expert_sweep.md").write_text(summary_markdown(results, costs, header))
    print((out / "expert_sweep.md").read_text())
    if failed:
        print(f"error: {len(failed)} job(s) failed, the first: {failed[0]}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    run_script(main)
