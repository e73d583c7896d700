"""The headline experiment end to end: baselines, one simulation per strategy, and the report.

Every phase logs its progress and its wall time; every model is scored on every domain's test set.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from fl.run import files
from fl.studies.baselines import FEDAVG, Scores, Workbench, ensemble, expert_seed, fine_tune, fit_base, make_workbench, one_shot
from fl.run.checkpoint import RunFolder, StrategyCheckpoint
from fl.run.config import RunConfig
from fl.data.splits import DomainData
from fl.modeling.model import num_attention_heads, save_merged
from fl.federation.permuted_init import client_seed, permuted_copy
from fl.run.phases import PhaseClock
from fl.studies.repair import repair, repaired_name
from fl.studies.report import effects, effects_json, markdown, plot_curves, table_row, versus
from fl.run.files import write_results
from fl.federation.rounds import CentralEvaluator, StrategyOutcome
from fl.federation.simulation import run_strategy
from strategies.rules import RuleSetting

StrategyRunner = Callable[[RunConfig, RuleSetting, dict[str, torch.Tensor], CentralEvaluator, StrategyCheckpoint], StrategyOutcome]

log = logging.getLogger(__name__)


def scores_json(scores: Scores) -> dict[str, dict[str, float]]:
    return {d: s.summary() for d, s in scores.items()}


def start_of_client(config: RunConfig, start: dict[str, torch.Tensor], client_index: int) -> dict[str, torch.Tensor]:
    """Where a model trained like client `client_index` starts: the shared start or its own permutation of it."""
    if config.init == "permuted":
        return permuted_copy(start, num_attention_heads(config.model), client_seed(config.seed, client_index))
    return start


def against_fedavg(strategies: list[str], one_shots: Mapping[str, object]) -> list[tuple[str, str]]:
    """Each rule's federated run against FedAvg's (when both ran), each one-shot merge against the average, and
    FedAvg's rounds against one average of the two experts (does federating lose anything?)."""
    pairs = [(name, "fedavg") for name in strategies if name != "fedavg" and "fedavg" in strategies]
    pairs += [(row, "one-shot-average") for row in one_shots if row != "one-shot-average"]
    if "fedavg" in strategies:
        pairs.append(("fedavg", "one-shot-average"))
    return pairs


def run_baselines(
    config: RunConfig, bench: Workbench, one_shots: Mapping[str, RuleSetting], out: Path, clock: PhaseClock
) -> tuple[dict[str, Scores], dict[str, torch.Tensor]]:
    """Base probe, experts (saved to `out`), multi-task, one-shot merges of the experts and the ensemble: their
    scores, and the strategies' common start (the base encoder with its probe heads)."""
    budget = config.rounds * config.local_steps
    domains = config.domains
    with clock.phase("base (linear probes on the frozen encoder)"):
        start, base_scores = fit_base(bench)
    models: dict[str, Scores] = {"base": base_scores}
    experts = {}
    for i, domain in enumerate(domains):
        with clock.phase(f"{domain} expert ({budget} steps)"):
            expert_start = start_of_client(config, start, i * config.clients_per_domain)
            experts[domain] = fine_tune(bench, expert_start, [domain], budget, expert_seed(config.seed, i), f"{domain} expert")
            models[f"{domain}-expert"] = bench.score(experts[domain])
            bench.model.load_state_dict(experts[domain])
            save_merged(bench.model, bench.tokenizer, out / f"{domain}-expert", bench.label_names)
    with clock.phase(f"multi-task ({budget} steps per domain)"):
        multitask = fine_tune(bench, start, domains, budget, config.seed + 7, "multi-task")
        models["multi-task"] = bench.score(multitask)
    for row, setting in one_shots.items():
        with clock.phase(f"{row} of the experts"):
            models[row] = bench.score(one_shot(bench, setting, start, experts, config.seed))
    models["ensemble"] = ensemble({d: models[f"{d}-expert"] for d in domains})
    return models, start


def run_experiment(
    config: RunConfig,
    model_path: str,
    data: Mapping[str, DomainData],
    strategies: list[RuleSetting],
    folder: RunFolder,
    versions: Mapping[str, str],
    runner: StrategyRunner = run_strategy,
    repair_steps: int = 0,
) -> dict[str, object]:
    """All phases; `runner` runs one strategy (a local Flower simulation by default, or a given Grid); with
    `repair_steps`, each strategy's final model is then repaired by distilling the experts into it (fl.studies.repair).

    What `folder` holds from an earlier, interrupted run of the same configuration is read back (baselines,
    finished strategies) or continued from its last completed round (a strategy's checkpoint).
    """
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(config.seed)
    out = folder.out
    clock = PhaseClock()
    domains = config.domains

    with clock.phase("tokenise and load model"):
        bench: Workbench = make_workbench(config, model_path, dict(data))
    one_shots = {"one-shot-average": FEDAVG}
    one_shots.update({f"one-shot-{s.name}": s for s in strategies if s.rule.one_shot and s.name != "fedavg"})
    saved = folder.baselines()
    if saved is not None:
        log.info("baselines read back from %s", out)
        models, start = saved
    else:
        models, start = run_baselines(config, bench, one_shots, out, clock)
        folder.save_baselines(models, start)

    curves = {}
    histories = {}
    names = [s.name for s in strategies]
    for setting in strategies:
        name = setting.name
        checkpoint = folder.strategy(name)
        done = checkpoint.load()
        if done is not None and done.finished:
            log.info("strategy %s: finished earlier, read back from %s", name, checkpoint.folder)
            curves[name], models[name], histories[name] = done.scores, done.scores[config.rounds], done.strategy["client-history"]
            continue
        with clock.phase(f"strategy {name}: Flower simulation, {config.num_clients} clients x {config.rounds} rounds"):
            evaluator = CentralEvaluator(bench.model, bench.test_sets, name, initial_scores=models["base"])
            outcome = runner(config, setting, start, evaluator, checkpoint)
            curves[name] = evaluator.history
            models[name] = evaluator.history[config.rounds]
            histories[name] = outcome.client_history
            bench.model.load_state_dict(outcome.final_state)
            save_merged(bench.model, bench.tokenizer, out / name, bench.label_names)
            checkpoint.finish()

    repaired: dict[str, object] = {}
    if repair_steps:
        with clock.phase(f"repair: distil the experts into {', '.join(names)} ({repair_steps} steps each)"):
            scores, repaired = repair(bench, out, names, repair_steps, config.seed)
            models.update(scores)
    repaired_rows = [repaired_name(n) for n in names] if repaired else []

    with clock.phase("report"):
        own_experts = {d: models[f"{d}-expert"][d] for d in domains}
        row_names = ["base", *[f"{d}-expert" for d in domains], "multi-task", *one_shots, "ensemble", *names, *repaired_rows]
        rows = [table_row(n, models[n], own_experts, config.seed) for n in row_names]
        found = effects(models, domains, [*one_shots, *names, *repaired_rows], config.seed)
        pairs = against_fedavg(names, one_shots) + [(repaired_name(n), n) for n in names if repaired]
        compared = versus(models, domains, pairs, config.seed)
        header = (
            f"# Bio + legal merge: {config.rounds} rounds x {config.local_steps} local steps, "
            f"{config.clients_per_domain} client(s) per domain, {config.partition} partition, {config.init} start, seed {config.seed}"
            + (f", attack {config.attack} by {', '.join(config.attackers())}" if config.attack else "")
            + (f", repaired by {repair_steps} distillation steps" if repair_steps else "")
        )
        files.write_text(out / "results.md", markdown(rows, found, domains, header, compared, sizes={d: (len(v.train), len(v.test)) for d, v in data.items()}))
        plot_curves(out / "curves.png", curves, {n: models[n] for n in row_names if n not in names}, domains)
    results = {
        "config": config.to_record(),
        "strategies-run": names,
        "strategy-options": {s.name: s.record() for s in strategies},
        "seed": config.seed,
        "attack": {"spec": config.attack, "clients": config.attackers()},  # who poisoned their updates (fl.modeling.attacks)
        "versions": dict(versions),
        "domains": {
            d: {"labels": list(v.train.label_names), "train-examples": len(v.train), "test-examples": len(v.test)}
            for d, v in data.items()
        },
        "baselines": {n: scores_json(models[n]) for n in row_names if n not in names and n not in repaired_rows},
        "repair": {**repaired, "scores": {n: scores_json(models[n]) for n in repaired_rows}} if repaired else {},
        "strategies": {
            n: {
                "rounds": [{"round": r, **scores_json(s)} for r, s in sorted(curves[n].items())],
                "clients": histories[n],
                "model-dir": str(out / n),
            }
            for n in names
        },
        "table": [
            {"model": r.name, "per-domain": r.per_domain, "mean": r.mean, "normalised": r.normalised} for r in rows
        ],
        "effects": effects_json(found),
        "against-fedavg": [{"claim": e.claim, "difference": e.difference, "verdict": e.verdict} for e in compared],
        "wall-seconds": clock.seconds,
    }
    write_results(out / "results.json", results)
    return results
