"""The many-domains benchmark: where merge rules part ways as more domains are merged.

Two related domains leave every rule within noise of averaging. Here every domain gets an expert; each selected rule
merges the experts of fixed subsets of 2, 3, 4... domains once (``fl.studies.subset_merges``), giving normalised
accuracy against the number of domains merged; then FedAvg and the rules that kept the most over all domains run
federated, and every model over all domains is compared with paired intervals on the mean over the domains.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch

from fl.data.splits import DomainData
from fl.federation.rounds import StrategyRunner
from fl.modeling.evaluation import Scores
from fl.run import files
from fl.run.checkpoint import RunFolder
from fl.run.config import RunConfig
from fl.run.files import write_results
from fl.run.phases import PhaseClock
from fl.studies.baselines import FEDAVG, ensemble, fit_base, make_workbench, score_and_save_experts, train_experts, train_multitask
from fl.studies.experiment import against_fedavg, run_strategies, scores_json
from fl.studies.report import Effect, markdown, paired_mean_difference, plot_curves, plot_transfer, table_row, transfer, transfer_markdown
from fl.studies.subset_merges import SIZES, best_rules, curve, curve_markdown, domain_subsets, one_shot_grid, plot_curve, rule_rows
from strategies.rules import RuleSetting

State = dict[str, torch.Tensor]


def federated_pairs(names: Sequence[str], one_shots: Sequence[str]) -> list[tuple[str, str]]:
    """Each federated rule against FedAvg and against its own one-shot merge, each one-shot merge against the average,
    and FedAvg against the one-shot average."""
    pairs = against_fedavg(list(names), dict.fromkeys(one_shots))
    return pairs + [(n, f"one-shot-{n}") for n in names if n != "fedavg" and f"one-shot-{n}" in one_shots]


def mean_differences(models: Mapping[str, Scores], domains: Sequence[str], pairs: Sequence[tuple[str, str]], seed: int) -> list[Effect]:
    return [Effect(f"{a} - {b}", paired_mean_difference(models[a], models[b], domains, seed)) for a, b in pairs]


def run_many_domains(
    config: RunConfig,
    model_path: str,
    data: Mapping[str, DomainData],
    settings: Sequence[RuleSetting],
    federated: int,
    folder: RunFolder,
    versions: Mapping[str, str],
    runner: StrategyRunner,
    sizes: Sequence[int] = SIZES,
) -> dict[str, object]:
    """Base, experts (saved), multi-task, ensemble; the one-shot grid of `settings` over the subsets; FedAvg and the
    `federated` best one-shot rules as Flower runs; results.md, results.json, subsets.png, curves.png, transfer.png."""
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(config.seed)
    out, clock, domains = folder.out, PhaseClock(), config.domains
    with clock.phase("tokenise and load model"):
        workbench = make_workbench(config, model_path, dict(data))
    with clock.phase("base (linear probes on the frozen encoder)"):
        start, base_scores = fit_base(workbench)
    models: dict[str, Scores] = {"base": base_scores}
    experts = train_experts(workbench, start, clock)
    with clock.phase("experts scored on every domain, and saved"):
        models.update(score_and_save_experts(workbench, experts, out))
    models["multi-task"] = workbench.score(train_multitask(workbench, start, clock))
    models["ensemble"] = ensemble({d: models[f"{d}-expert"] for d in domains})

    rows = rule_rows(settings)
    subsets = domain_subsets(domains, sizes)
    grid = one_shot_grid(workbench, rows, start, experts, models, subsets, clock)
    table = curve(grid)
    every = [m for m in grid if len(m.domains) == len(domains) and m.rule in rows]
    models.update({f"one-shot-{m.rule}": m.scores for m in every})
    chosen = [FEDAVG, *[rows[name] for name in best_rules(grid, table, federated)]]
    names = [s.name for s in chosen]
    curves, histories = run_strategies(config, workbench, chosen, start, base_scores, folder, runner, clock)
    models.update({name: curves[name][config.rounds] for name in names})

    with clock.phase("report"):
        one_shots = [f"one-shot-{m.rule}" for m in every]
        row_names = ["base", *[f"{d}-expert" for d in domains], "multi-task", *one_shots, "ensemble", *names]
        own = {d: models[f"{d}-expert"][d] for d in domains}
        six_rows = [table_row(n, models[n], own, config.seed) for n in row_names]
        compared = mean_differences(models, domains, federated_pairs(names, one_shots), config.seed)
        sizes_seen = {d: (len(v.train), len(v.test)) for d, v in data.items()}
        transfers = transfer(models, domains)
        budget = config.rounds * config.local_steps
        text = "\n".join([
            f"# Many domains: {len(domains)} domains ({', '.join(domains)}), experts of {budget} steps, "
            f"{config.rounds} rounds x {config.local_steps} local steps federated, seed {config.seed}",
            "",
            "## 1. One-shot merges of the experts against the number of domains merged",
            "",
            curve_markdown(table, subsets),
            "![normalised accuracy against domains merged](subsets.png)",
            "",
            markdown(six_rows, [], domains, f"## 2. All {len(domains)} domains: baselines, one-shot merges, FedAvg and the best one-shot rules federated",
                     compared, sizes=sizes_seen, compared_title=f"mean over the {len(domains)} domains"),
            "## 3. Transfer: each expert on every domain (accuracy in %)",
            "",
            transfer_markdown(transfers),
        ])
        files.write_text(out / "results.md", text)
        plot_curve(out / "subsets.png", table)
        plot_curves(out / "curves.png", curves, {n: models[n] for n in ["base", "multi-task", "one-shot-average"]}, domains)
        plot_transfer(out / "transfer.png", transfers)
    results = {
        "config": config.to_record(),
        "versions": dict(versions),
        "domains": {d: {"labels": list(v.train.label_names), "train-examples": len(v.train), "test-examples": len(v.test)} for d, v in data.items()},
        "subsets": {str(k): [list(s) for s in v] for k, v in subsets.items()},
        "one-shot-grid": [m.record() for m in grid],
        "curve": {rule: {str(k): v for k, v in by_size.items()} for rule, by_size in table.items()},
        "federated": names,
        "strategy-options": {s.name: s.record() for s in chosen},
        "models": {n: scores_json(models[n]) for n in row_names},
        "strategies": {
            n: {"rounds": [{"round": r, **scores_json(s)} for r, s in sorted(curves[n].items())], "clients": histories[n], "model-dir": str(out / n)}
            for n in names
        },
        "table": [{"model": r.name, "per-domain": r.per_domain, "mean": r.mean, "normalised": r.normalised} for r in six_rows],
        "mean-differences": [{"claim": e.claim, "difference": e.difference, "verdict": e.verdict} for e in compared],
        "transfer": transfers,
        "wall-seconds": clock.seconds,
    }
    write_results(out / "results.json", results)
    return results

