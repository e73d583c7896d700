"""The headline experiment end to end: baselines, one simulation per strategy, repair, and the report.

Every phase logs its progress and its wall time; every model is scored on every domain's test set.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from fl.data.splits import DomainData
from fl.federation.rounds import CentralEvaluator, StrategyJob, StrategyRunner, read_back, run_and_save
from fl.federation.simulation import run_strategy
from fl.modeling.evaluation import Scores
from fl.modeling.peft_merges import COMBINATIONS, PeftCombination
from fl.run import files
from fl.run.checkpoint import RunFolder
from fl.run.config import RunConfig
from fl.run.files import write_results
from fl.run.phases import PhaseClock
from fl.studies.baselines import FEDAVG, Workbench, ensemble, fit_base, make_workbench, one_shot, score_and_save_experts, train_experts, train_multitask
from fl.studies.repair import repair, repaired_name
from fl.studies.report import Row, effects, effects_json, markdown, plot_curves, plot_transfer, table_row, transfer, transfer_markdown, versus
from strategies.rules import RuleSetting

log = logging.getLogger(__name__)
State = dict[str, torch.Tensor]


def scores_json(scores: Scores) -> dict[str, dict[str, float]]:
    return {d: s.summary() for d, s in scores.items()}


def against_fedavg(strategies: list[str], one_shots: Mapping[str, object]) -> list[tuple[str, str]]:
    """Each rule's federated run against FedAvg's (when both ran), each one-shot merge against the average, and
    FedAvg's rounds against one average of the two experts (does federating lose anything?)."""
    pairs = [(name, "fedavg") for name in strategies if name != "fedavg" and "fedavg" in strategies]
    pairs += [(row, "one-shot-average") for row in one_shots if row != "one-shot-average"]
    if "fedavg" in strategies:
        pairs.append(("fedavg", "one-shot-average"))
    return pairs


def one_shot_rows(strategies: list[RuleSetting], peft: str = "none") -> dict[str, RuleSetting | PeftCombination]:
    """The one-shot merges of the experts: the average always, every selected rule that has a one-shot form, and
    with LoRA experts PEFT's own combinations of their adapters (the reference a PEFT user would reach for)."""
    rows: dict[str, RuleSetting | PeftCombination] = {"one-shot-average": FEDAVG}
    rows.update({f"one-shot-{s.name}": s for s in strategies if s.rule.one_shot and s.name != "fedavg"})
    if peft == "lora":
        rows.update({f"one-shot-peft-{c}": PeftCombination(c) for c in COMBINATIONS})
    return rows


def run_baselines(
    config: RunConfig, workbench: Workbench, one_shots: Mapping[str, RuleSetting | PeftCombination], out: Path, clock: PhaseClock
) -> tuple[dict[str, Scores], State]:
    """Base probe, experts (saved to `out`), multi-task, one-shot merges of the experts and the ensemble: their
    scores, and the strategies' common start (the base encoder with its probe heads)."""
    domains = config.domains
    with clock.phase("base (linear probes on the frozen encoder)"):
        start, base_scores = fit_base(workbench)
    models: dict[str, Scores] = {"base": base_scores}
    experts = train_experts(workbench, start, clock)
    models.update(score_and_save_experts(workbench, experts, out))
    models["multi-task"] = workbench.score(train_multitask(workbench, start, clock))
    for row, setting in one_shots.items():
        with clock.phase(f"{row} of the experts"):
            models[row] = workbench.score(one_shot(workbench, setting, start, experts, config.seed))
    models["ensemble"] = ensemble({d: models[f"{d}-expert"] for d in domains})
    return models, start


def baselines_once(
    config: RunConfig, workbench: Workbench, one_shots: Mapping[str, RuleSetting | PeftCombination], folder: RunFolder, clock: PhaseClock
) -> tuple[dict[str, Scores], State]:
    """The baselines' scores and the strategies' start: read back when an earlier run of this folder got that far."""
    saved = folder.baselines()
    if saved is not None:
        log.info("baselines read back from %s", folder.out)
        return saved
    models, start = run_baselines(config, workbench, one_shots, folder.out, clock)
    folder.save_baselines(models, start)
    return models, start


def run_strategies(
    config: RunConfig,
    workbench: Workbench,
    strategies: list[RuleSetting],
    start: State,
    base_scores: Scores,
    folder: RunFolder,
    runner: StrategyRunner,
    clock: PhaseClock,
) -> tuple[dict[str, dict[int, Scores]], dict[str, list[dict[str, object]]]]:
    """Each strategy's per-round scores and client history; a finished strategy is read back, an interrupted one
    continues from its last completed round, and each final model is saved in its own folder."""
    curves, histories = {}, {}
    for setting in strategies:
        name = setting.name
        evaluator = CentralEvaluator(workbench.model, workbench.test_sets, name, initial_scores=base_scores)
        job = StrategyJob(config, setting, start, evaluator, folder.strategy(name), workbench.text_for(setting))
        outcome = read_back(job)
        if outcome is None:
            with clock.phase(f"strategy {name}: Flower simulation, {config.num_clients} clients x {config.rounds} rounds"):
                outcome = run_and_save(job, runner, lambda state, name=name: workbench.save(state, folder.out / name))
        curves[name] = evaluator.history
        histories[name] = outcome.client_history
    return curves, histories


def write_report(
    config: RunConfig,
    data: Mapping[str, DomainData],
    models: Mapping[str, Scores],
    curves: Mapping[str, Mapping[int, Scores]],
    row_names: list[str],
    merged: list[str],
    pairs: list[tuple[str, str]],
    out: Path,
    repair_steps: int,
) -> tuple[list[Row], dict[str, object]]:
    """results.md, curves.png and transfer.png; the table's rows, and the effects and transfer for results.json."""
    domains = config.domains
    own_experts = {d: models[f"{d}-expert"][d] for d in domains}
    rows = [table_row(n, models[n], own_experts, config.seed) for n in row_names]
    found = effects(models, domains, merged, config.seed)
    compared = versus(models, domains, pairs, config.seed)
    header = (
        f"# {' + '.join(config.domains).capitalize()} merge: {config.rounds} rounds x {config.local_steps} local steps, "
        f"{config.clients_per_domain} client(s) per domain, {config.partition} partition, {config.init} start, seed {config.seed}"
        + (f", attack {config.attack} by {', '.join(config.attackers())}" if config.attack else "")
        + (f", repaired by {repair_steps} distillation steps" if repair_steps else "")
    )
    sizes = {d: (len(v.train), len(v.test)) for d, v in data.items()}
    transfers = transfer(models, domains)
    transfer_section = "\n## Transfer: each expert on every domain (accuracy in %)\n\n" + transfer_markdown(transfers)
    files.write_text(out / "results.md", markdown(rows, found, domains, header, compared, sizes=sizes) + transfer_section)
    plot_curves(out / "curves.png", curves, {n: models[n] for n in row_names if n not in curves}, domains)
    plot_transfer(out / "transfer.png", transfers)
    report_record = {
        "transfer": transfers,
        "effects": effects_json(found),
        "against-fedavg": [{"claim": e.claim, "difference": e.difference, "verdict": e.verdict} for e in compared],
    }
    return rows, report_record


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
    with clock.phase("tokenise and load model"):
        workbench = make_workbench(config, model_path, dict(data))
    one_shots = one_shot_rows(strategies, config.peft)
    models, start = baselines_once(config, workbench, one_shots, folder, clock)
    names = [s.name for s in strategies]
    curves, histories = run_strategies(config, workbench, strategies, start, models["base"], folder, runner, clock)
    models.update({name: curves[name][config.rounds] for name in names})

    repaired: dict[str, object] = {}
    if repair_steps:
        with clock.phase(f"repair: distil the experts into {', '.join(names)} ({repair_steps} steps each)"):
            scores, repaired = repair(workbench, out, names, repair_steps, config.seed)
            models.update(scores)
    repaired_rows = [repaired_name(n) for n in names] if repaired else []

    with clock.phase("report"):
        row_names = ["base", *[f"{d}-expert" for d in config.domains], "multi-task", *one_shots, "ensemble", *names, *repaired_rows]
        pairs = against_fedavg(names, one_shots) + [(repaired_name(n), n) for n in names if repaired]
        rows, report_record = write_report(
            config, data, models, curves, row_names, [*one_shots, *names, *repaired_rows], pairs, out, repair_steps
        )
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
        **report_record,
        "wall-seconds": clock.seconds,
    }
    write_results(out / "results.json", results)
    return results
