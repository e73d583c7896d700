"""Turn scores into the run's results: results.json, results.md and curves.png.

Intervals are 95% percentile bootstraps over test examples. Differences between two models are
bootstrapped paired (the same resampled examples for both), which is what says whether an effect
holds beyond noise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fl.modeling.evaluation import Score, Scores  # noqa: E402
from fl.run import files  # noqa: E402

DRAWS = 2000


@dataclass(frozen=True)
class Row:
    name: str
    per_domain: dict[str, tuple[float, float, float]]  # accuracy, ci low, ci high
    mean: tuple[float, float, float]
    normalised: tuple[float, float, float]


def _resample(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(DRAWS, n))


def _ci(values: np.ndarray) -> tuple[float, float]:
    lo, hi = np.quantile(values, [0.025, 0.975])
    return float(lo), float(hi)


def table_row(name: str, scores: Scores, experts: Scores, seed: int) -> Row:
    """Accuracy per domain, their mean, and accuracy normalised by each domain's own expert."""
    domains = list(scores)
    draws = {d: _resample(len(scores[d].correct), seed + i) for i, d in enumerate(domains)}
    acc = {d: scores[d].correct[draws[d]].mean(axis=1) for d in domains}
    ref = {d: experts[d].correct[draws[d]].mean(axis=1) for d in domains}
    mean_draws = np.mean([acc[d] for d in domains], axis=0)
    norm_draws = np.mean([acc[d] / np.maximum(ref[d], 1e-9) for d in domains], axis=0)
    point_mean = float(np.mean([scores[d].accuracy for d in domains]))
    point_norm = float(np.mean([scores[d].accuracy / max(experts[d].accuracy, 1e-9) for d in domains]))
    return Row(
        name,
        {d: (scores[d].accuracy, *_ci(acc[d])) for d in domains},
        (point_mean, *_ci(mean_draws)),
        (point_norm, *_ci(norm_draws)),
    )


def paired_difference(a: Score, b: Score, seed: int) -> tuple[float, float, float]:
    """accuracy(a) - accuracy(b) on the same test examples, with its paired bootstrap interval."""
    diff = a.correct.astype(float) - b.correct.astype(float)
    draws = diff[_resample(len(diff), seed)].mean(axis=1)
    return (float(diff.mean()), *_ci(draws))


def paired_mean_difference(a: Scores, b: Scores, domains: Sequence[str], seed: int) -> tuple[float, float, float]:
    """mean over `domains` of accuracy(a) - accuracy(b), each domain's examples resampled paired (the same draws for
    both models, independent between domains)."""
    diffs = [a[d].correct.astype(float) - b[d].correct.astype(float) for d in domains]
    draws = np.mean([diff[_resample(len(diff), seed + i)].mean(axis=1) for i, diff in enumerate(diffs)], axis=0)
    return (float(np.mean([diff.mean() for diff in diffs])), *_ci(draws))


@dataclass(frozen=True)
class Effect:
    claim: str
    difference: tuple[float, float, float]

    @property
    def holds(self) -> bool:
        """The whole interval lies above zero: the claim holds beyond noise."""
        return self.difference[1] > 0

    @property
    def verdict(self) -> str:
        """For a plain difference a - b: which is better beyond noise, if either."""
        return "higher" if self.difference[1] > 0 else "lower" if self.difference[2] < 0 else "within noise"


def effects_json(found: Sequence[Effect]) -> list[dict[str, object]]:
    return [{"claim": e.claim, "difference": e.difference, "holds": e.holds} for e in found]


def effects(models: Mapping[str, Scores], domains: Sequence[str], merged: Sequence[str], seed: int) -> list[Effect]:
    """The three things the headline should show, each as 'x - y > 0' on one domain's examples."""
    found: list[Effect] = []
    for d in domains:
        own = f"{d}-expert"
        found.append(Effect(f"{own} beats base on {d}", paired_difference(models[own][d], models["base"][d], seed)))
    for d in domains:
        for other in domains:
            if other != d:
                expert = f"{other}-expert"
                found.append(
                    Effect(f"{expert} loses {d} accuracy vs base", paired_difference(models["base"][d], models[expert][d], seed))
                )
    for name in merged:
        for d in domains:
            own = f"{d}-expert"
            for other in domains:
                if other == d:
                    continue
                forgetting = f"{other}-expert"
                found.append(
                    Effect(f"{name} above {forgetting} on {d}", paired_difference(models[name][d], models[forgetting][d], seed))
                )
            found.append(Effect(f"{name} below {own} on {d}", paired_difference(models[own][d], models[name][d], seed)))
    return found


def versus(models: Mapping[str, Scores], domains: Sequence[str], pairs: Sequence[tuple[str, str]], seed: int) -> list[Effect]:
    """Paired differences a - b on each domain's examples, e.g. every merge rule against FedAvg."""
    return [Effect(f"{a} - {b} on {d}", paired_difference(models[a][d], models[b][d], seed)) for a, b in pairs for d in domains]


def _fmt(value: tuple[float, float, float], scale: float = 100.0) -> str:
    return f"{value[0] * scale:.1f} [{value[1] * scale:.1f}, {value[2] * scale:.1f}]"


def sizes_line(sizes: Mapping[str, tuple[int, int]]) -> str:
    """Train and test examples per domain and the precision the test size allows: the normal-approximation 95%
    half-width 1.96 sqrt(p(1-p)/n) at p = 0.5, the widest it gets (narrower near 0% or 100% accuracy)."""
    counts = ", ".join(f"{d} {train} train / {test} test" for d, (train, test) in sizes.items())
    widths = ", ".join(f"+-{100 * 1.96 * math.sqrt(0.25 / max(test, 1)):.1f} points on {d}" for d, (_, test) in sizes.items())
    return (
        f"Examples per domain: {counts}. With n test examples an accuracy's 95% interval reaches at most "
        f"1.96 sqrt(0.25/n) either side (its width at 50% accuracy): {widths}; paired differences are often tighter."
    )


def markdown(
    rows: Sequence[Row],
    found: Sequence[Effect],
    domains: Sequence[str],
    header: str,
    compared: Sequence[Effect] = (),
    sizes: Mapping[str, tuple[int, int]] | None = None,
    compared_title: str = "against FedAvg / the one-shot average",
) -> str:
    """The table, its effects and comparisons; ``sizes`` (train, test examples per domain) adds what they mean for
    precision."""
    cols = [f"{d} accuracy" for d in domains] + ["mean", "normalised (merged / expert)"]
    lines = [header, "", "| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for row in rows:
        cells = [_fmt(row.per_domain[d]) for d in domains] + [_fmt(row.mean), _fmt(row.normalised)]
        lines.append(f"| {row.name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Accuracy in %, normalised accuracy as a ratio in %; [95% bootstrap interval over test examples].",
        *(["", sizes_line(sizes)] if sizes else []),
    ]
    if found:
        lines += ["", "| effect | difference (points) [paired 95% interval] | holds beyond noise |", "|---|---|---|"]
        lines += [f"| {e.claim} | {_fmt(e.difference)} | {'yes' if e.holds else 'no'} |" for e in found]
    if compared:
        lines += ["", f"| {compared_title} | difference (points) [paired 95% interval] | beyond noise |", "|---|---|---|"]
        lines += [f"| {e.claim} | {_fmt(e.difference)} | {e.verdict} |" for e in compared]
    return "\n".join(lines) + "\n"


def transfer(models: Mapping[str, Scores], domains: Sequence[str]) -> dict[str, dict[str, float]]:
    """Each domain's expert scored on every domain (accuracy): the diagonal is what each expert learnt, the rest what
    the others' heads still read from its features."""
    return {f"{e}-expert": {d: models[f"{e}-expert"][d].accuracy for d in domains} for e in domains}


def transfer_markdown(table: Mapping[str, Mapping[str, float]]) -> str:
    domains = list(next(iter(table.values())))
    lines = ["| expert \\ scored on | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
    lines += [f"| {expert} | " + " | ".join(f"{100 * row[d]:.1f}" for d in domains) + " |" for expert, row in table.items()]
    return "\n".join(lines) + "\n"


def spread_markdown(header: str, runs: Mapping[str, Sequence[Effect]]) -> str:
    """One row per effect, one column per run (e.g. per training seed), and in how many runs it holds."""
    names = list(runs)
    claims = [e.claim for e in next(iter(runs.values()))]
    lines = [header, "", "| effect | " + " | ".join(names) + " | holds in |", "|---|" + "---|" * (len(names) + 1)]
    for i, claim in enumerate(claims):
        found = [runs[n][i] for n in names]
        cells = [_fmt(e.difference) + (" *" if e.holds else "") for e in found]
        lines.append(f"| {claim} | " + " | ".join(cells) + f" | {sum(e.holds for e in found)} of {len(found)} |")
    lines += ["", "Differences in points [paired 95% bootstrap interval over test examples]; * = beyond noise."]
    return "\n".join(lines) + "\n"


def label_positions(values: Sequence[float], min_gap: float) -> list[float]:
    """Heights for labels of lines at `values`: each crowded group spread `min_gap` apart around its mean,
    labels with room left at their line's height."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    groups: list[list[int]] = []  # runs of labels (in height order) that must be spread together

    def spread(group: list[int]) -> list[float]:
        centre = sum(values[i] for i in group) / len(group)
        return [centre + (k - (len(group) - 1) / 2) * min_gap for k in range(len(group))]

    for i in order:
        groups.append([i])
        while len(groups) > 1 and spread(groups[-2])[-1] + min_gap > spread(groups[-1])[0] + 1e-12:
            groups[-2:] = [groups[-2] + groups[-1]]
    heights = [0.0] * len(values)
    for group in groups:
        for i, height in zip(group, spread(group)):
            heights[i] = height
    return heights


def plot_curves(
    path: Path,
    curves: Mapping[str, Mapping[int, Scores]],
    baselines: Mapping[str, Scores],
    domains: Sequence[str],
) -> None:
    """Per-round accuracy of each strategy on each domain, baselines as horizontal lines labelled on the right
    (baselines with the same accuracy share a line and a label, e.g. the ensemble and the domain's expert)."""
    fig, axes = plt.subplots(1, len(domains), figsize=(6.5 * len(domains), 4.2), squeeze=False)
    styles = ["--", ":", "-.", (0, (1, 1)), (0, (5, 1)), (0, (3, 1, 1, 1))]
    for ax, domain in zip(axes[0], domains):
        levels: dict[float, list[str]] = {}
        for name, scores in baselines.items():
            levels.setdefault(scores[domain].accuracy, []).append(name)
        for (level, names), style in zip(levels.items(), styles * 2):
            ax.axhline(level, linestyle=style, color="grey", linewidth=1)
        for name, rounds in curves.items():
            xs = sorted(rounds)
            ax.plot(xs, [rounds[r][domain].accuracy for r in xs], marker="o", label=name)
        low, high = ax.get_ylim()
        heights = label_positions(list(levels), 0.045 * (high - low))
        for (level, names), height in zip(levels.items(), heights):
            ax.annotate(
                " = ".join(names), (1.0, level), xytext=(1.02, height), textcoords=("axes fraction", "data"),
                xycoords=("axes fraction", "data"), fontsize=7, color="dimgrey", va="center",
                arrowprops={"arrowstyle": "-", "color": "lightgrey", "linewidth": 0.6},
            )
        ax.set_ylim(low, high)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{domain}: global model accuracy per round")
        ax.set_xlabel("round")
        ax.set_ylabel("accuracy")
        ax.legend(loc="lower right", fontsize=8)
    save_figure(fig, path)


def plot_scores(path: Path, models: Mapping[str, Scores], domains: Sequence[str]) -> None:
    """Accuracy of every model on every domain as grouped bars (one-shot studies have no rounds to plot)."""
    names = list(models)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(names)), 4.2))
    width = 0.8 / len(domains)
    for i, domain in enumerate(domains):
        xs = np.arange(len(names)) + (i - (len(domains) - 1) / 2) * width
        ax.bar(xs, [models[n][domain].accuracy for n in names], width, label=domain)
    ax.set_xticks(np.arange(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_transfer(path: Path, table: Mapping[str, Mapping[str, float]]) -> None:
    """The transfer table as a heat map, each cell labelled with its accuracy in %."""
    experts, domains = list(table), list(next(iter(table.values())))
    values = np.array([[table[e][d] for d in domains] for e in experts])
    fig, ax = plt.subplots(figsize=(1.2 * len(domains) + 2.5, 0.6 * len(experts) + 1.8))
    image = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=1.0)
    for (i, j), value in np.ndenumerate(values):
        ax.text(j, i, f"{100 * value:.1f}", ha="center", va="center", fontsize=8, color="white" if value < 0.6 else "black")
    ax.set_xticks(range(len(domains)), domains, rotation=30, ha="right")
    ax.set_yticks(range(len(experts)), experts)
    ax.set_xlabel("scored on")
    ax.set_title("each expert on every domain (accuracy)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    save_figure(fig, path)


def save_figure(fig: plt.Figure, path: Path) -> None:
    """Laid out and written atomically in the format the file name says."""
    fig.tight_layout()
    with files.replaced(path) as temporary:
        fig.savefig(temporary, dpi=120, bbox_inches="tight", format=path.suffix.lstrip("."))
    plt.close(fig)
