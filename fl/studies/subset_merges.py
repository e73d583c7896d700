"""One-shot merges of the experts over subsets of the domains: what each rule keeps as more domains are merged.

Every selected rule merges the experts of the same fixed subsets (``domain_subsets``); each merge is scored on its
subset's domains only, as normalised accuracy (merged / own expert, averaged over the subset), and the curve is
that against the number of domains merged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fl.modeling.evaluation import Scores
from fl.run.phases import PhaseClock
from fl.studies.baselines import Workbench, expert_updates, merge_updates
from fl.studies.experiment import one_shot_rows
from fl.studies.report import Row, plt, save_figure, table_row  # the report's pyplot: its Agg backend is set there
from strategies.rules import RuleSetting

log = logging.getLogger(__name__)
State = dict[str, torch.Tensor]

SIZES = (2, 3, 4, 6)  # numbers of domains merged, clipped to the run's domains (all of them always included)
OFFSETS = (0, 2, 4)  # where each size's windows of consecutive domains start (see domain_subsets)
NO_MERGE = "base (no merge)"


def domain_subsets(domains: Sequence[str], sizes: Sequence[int] = SIZES) -> dict[int, list[tuple[str, ...]]]:
    """For each size k below the number of domains n: the windows of k consecutive domains (in the run's order,
    wrapping around) starting at positions 0, 2 and 4 (mod n), repeats dropped; for k = n, all domains. With the
    six embedded domains each pair set covers every domain once, and every domain is in some subset of each size."""
    n = len(domains)
    subsets: dict[int, list[tuple[str, ...]]] = {}
    for k in sorted({min(k, n) for k in sizes} | {n}):
        if k < 2:
            raise ValueError(f"subset size {k}: expected at least 2 domains")
        windows: list[tuple[str, ...]] = []
        for offset in OFFSETS if k < n else (0,):
            window = tuple(domains[(offset + i) % n] for i in range(k))
            if set(window) not in [set(w) for w in windows]:
                windows.append(window)
        subsets[k] = windows
    return subsets


def rule_rows(settings: Sequence[RuleSetting]) -> dict[str, RuleSetting]:
    """The headline's one-shot rows (the average always, then each selected rule with a one-shot form), named by
    rule: the grid's lines."""
    return {name.removeprefix("one-shot-"): setting for name, setting in one_shot_rows(list(settings)).items()}


@dataclass(frozen=True)
class SubsetMerge:
    """One rule's one-shot merge of one subset's experts, scored on that subset's domains."""

    rule: str
    domains: tuple[str, ...]
    scores: Scores  # on the subset's domains
    row: Row  # accuracy per domain, mean and normalised, each with its bootstrap interval

    def record(self) -> dict[str, object]:
        return {"rule": self.rule, "domains": list(self.domains), "size": len(self.domains), "normalised": self.row.normalised,
                "accuracy": self.row.per_domain}


def one_shot_grid(
    workbench: Workbench,
    rows: Mapping[str, RuleSetting],
    start: State,
    experts: Mapping[str, State],
    models: Mapping[str, Scores],
    subsets: Mapping[int, Sequence[tuple[str, ...]]],
    clock: PhaseClock,
) -> list[SubsetMerge]:
    """Every rule over every subset, plus the unmerged base on each subset (the floor). Each expert's statistic is
    computed once per rule; each merge is scored on its subset's test sets only."""
    seed = workbench.config.seed
    own = {d: models[f"{d}-expert"][d] for d in experts}
    grid = [
        SubsetMerge(NO_MERGE, subset, {d: models["base"][d] for d in subset}, table_row(NO_MERGE, {d: models["base"][d] for d in subset}, own, seed))
        for size in subsets for subset in subsets[size]
    ]
    for name, setting in rows.items():
        with clock.phase(f"one-shot {name} over {sum(len(s) for s in subsets.values())} subsets of the experts"):
            updates = dict(zip(experts, expert_updates(workbench, setting, experts, seed)))
            for size, chosen in subsets.items():
                for subset in chosen:
                    merged = merge_updates(workbench, setting, start, [updates[d] for d in subset], seed)
                    scores = workbench.score(merged, subset)
                    grid.append(SubsetMerge(name, subset, scores, table_row(name, scores, own, seed)))
                    log.info("one-shot %s of %s: normalised %.1f%%", name, "+".join(subset), 100 * grid[-1].row.normalised[0])
    return grid


def curve(grid: Sequence[SubsetMerge]) -> dict[str, dict[int, tuple[float, float, float]]]:
    """Per rule and number of domains: the mean normalised accuracy over that size's subsets, and its lowest and
    highest subset."""
    found: dict[str, dict[int, list[float]]] = {}
    for merge in grid:
        found.setdefault(merge.rule, {}).setdefault(len(merge.domains), []).append(merge.row.normalised[0])
    return {rule: {k: (float(np.mean(v)), min(v), max(v)) for k, v in sizes.items()} for rule, sizes in found.items()}


def best_rules(grid: Sequence[SubsetMerge], table: Mapping[str, Mapping[int, tuple[float, float, float]]], count: int) -> list[str]:
    """The `count` rules with the highest normalised accuracy over the most domains, leaving out the unmerged base and
    every rule whose merge of all domains predicts exactly as the average's (FedAvg under another name, e.g. the
    alignment of experts that share their start); ties keep the grid's order."""
    largest = max(len(m.domains) for m in grid)
    every = {m.rule: m.scores for m in grid if len(m.domains) == largest}
    average = every["average"]
    same = {r for r, scores in every.items() if all(np.array_equal(scores[d].correct, average[d].correct) for d in average)}
    candidates = [r for r in every if r != NO_MERGE and r not in same]
    return sorted(candidates, key=lambda r: -table[r][largest][0])[:count]


def curve_markdown(table: Mapping[str, Mapping[int, tuple[float, float, float]]], subsets: Mapping[int, Sequence[tuple[str, ...]]]) -> str:
    sizes = sorted(subsets)
    lines = [
        "| rule \\ domains merged | " + " | ".join(f"{k} ({len(subsets[k])} subset{'s' if len(subsets[k]) > 1 else ''})" for k in sizes)
        + f" | change {sizes[0]} -> {sizes[-1]} |",
        "|---|" + "---|" * (len(sizes) + 1),
    ]
    for rule, by_size in table.items():
        cells = [
            f"{100 * by_size[k][0]:.1f}" + (f" [{100 * by_size[k][1]:.1f}, {100 * by_size[k][2]:.1f}]" if len(subsets[k]) > 1 else "")
            for k in sizes
        ]
        change = 100 * (by_size[sizes[-1]][0] - by_size[sizes[0]][0])
        lines.append(f"| {rule} | " + " | ".join(cells) + f" | {change:+.1f} |")
    lines += [
        "",
        "Normalised accuracy (merged / own expert, mean over the merged domains) in %; the mean over each size's subsets "
        "[its lowest, highest subset]. Subsets: " + "; ".join(f"{k}: " + ", ".join("+".join(s) for s in subsets[k]) for k in sizes) + ".",
    ]
    return "\n".join(lines) + "\n"


def plot_curve(path: Path, table: Mapping[str, Mapping[int, tuple[float, float, float]]]) -> None:
    """Normalised accuracy against the number of domains merged, one line per rule (the band: lowest to highest
    subset), the unmerged base dashed."""
    fig, ax = plt.subplots(figsize=(7.0, 4.5))
    for rule, by_size in table.items():
        sizes = sorted(by_size)
        means = [100 * by_size[k][0] for k in sizes]
        style = {"linestyle": "--", "color": "grey"} if rule == NO_MERGE else {"marker": "o"}
        (line,) = ax.plot(sizes, means, label=rule, **style)
        ax.fill_between(sizes, [100 * by_size[k][1] for k in sizes], [100 * by_size[k][2] for k in sizes], color=line.get_color(), alpha=0.08)
    ax.set_xticks(sorted(next(iter(table.values()))))
    ax.set_xlabel("domains merged")
    ax.set_ylabel("normalised accuracy (% of own expert)")
    ax.set_title("one-shot merge of the experts: what each rule keeps")
    ax.legend(fontsize=8)
    save_figure(fig, path)
