"""Loss and accuracy along the straight line between two models, naive and after permutation alignment.

The loss barrier of two models A and B is how much worse the models on the segment
``(1 - t) * A + t * B`` get than their end points: ``max_t L(t) - (L(0) + L(1)) / 2``, the definition of
Ainsworth, Hayase & Srinivasa, "Git Re-Basin" (ICLR 2023, arXiv:2209.04836, section 2). A high barrier is
why averaging the two fails; weight matching (``strategies.permutation``) permutes B's hidden units to
line up with A's first, which leaves B's function unchanged but can lower the barrier to near zero.
Accuracy gets the mirror-image drop ``(acc(0) + acc(1)) / 2 - min_t acc(t)``.

The mean of the end points counts half the gap between them as barrier even on a straight path (an expert
scored on the other expert's domain has a much higher loss than that expert). The chord form of Frankle
et al., "Linear Mode Connectivity and the Lottery Ticket Hypothesis" (ICML 2020, arXiv:1912.05671),
``max_t [L(t) - ((1 - t) L(0) + t L(1))]``, does not, so it is reported next to it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from fl.data.batches import Encoded  # noqa: E402
from fl.modeling.evaluation import Scores, evaluate  # noqa: E402
from fl.modeling.model import MultiHeadEncoder  # noqa: E402
from strategies.permutation import Alignment, align_to, permutation_spec  # noqa: E402

State = Mapping[str, Tensor]
METRICS = ("loss", "accuracy")


def interpolate(a: State, b: State, t: float) -> dict[str, Tensor]:
    """``(1 - t) * a + t * b`` key by key; exactly ``a`` at t = 0 and ``b`` at t = 1. Integer tensors must agree."""
    if a.keys() != b.keys():
        raise ValueError(f"the models hold different parameters: {sorted(a.keys() ^ b.keys())[:4]}")
    mixed = {}
    for key, wa in a.items():
        wb = b[key]
        if wa.shape != wb.shape:
            raise ValueError(f"parameter {key!r} has shapes {tuple(wa.shape)} and {tuple(wb.shape)}")
        if wa.is_floating_point():
            mixed[key] = (1 - t) * wa + t * wb
        elif torch.equal(wa, wb):
            mixed[key] = wa
        else:
            raise ValueError(f"non-float parameter {key!r} differs between the models and cannot be interpolated")
    return mixed


def path_points(count: int) -> list[float]:
    """``count`` evenly spaced t in [0, 1], both ends included."""
    if count < 2:
        raise ValueError(f"a path needs at least 2 points, got {count}")
    return np.linspace(0.0, 1.0, count).tolist()


def loss_barrier(losses: Sequence[float]) -> float:
    """Highest loss on the path minus the mean of the two end points' losses."""
    return max(losses) - (losses[0] + losses[-1]) / 2


def accuracy_drop(accuracies: Sequence[float]) -> float:
    """Mean of the two end points' accuracies minus the lowest accuracy on the path."""
    return (accuracies[0] + accuracies[-1]) / 2 - min(accuracies)


def above_chord(values: Sequence[float], ts: Sequence[float]) -> float:
    """Largest excess of ``values`` over the straight line between its end points (Frankle et al.)."""
    return max(v - ((1 - t) * values[0] + t * values[-1]) for v, t in zip(values, ts))


def evaluate_path(
    model: MultiHeadEncoder,
    test_sets: Mapping[str, Encoded],
    a: State,
    b: State,
    ts: Sequence[float],
    on_point: Callable[[int, float, Scores], None] | None = None,
) -> list[Scores]:
    """Score every domain with its own head at each point of the segment from ``a`` to ``b``."""
    path = []
    for index, t in enumerate(ts):
        model.load_state_dict(interpolate(a, b, t))
        scores = {domain: evaluate(model, domain, data) for domain, data in test_sets.items()}
        path.append(scores)
        if on_point is not None:
            on_point(index, t, scores)
    return path


def curves(path: Sequence[Scores]) -> dict[str, dict[str, list[float]]]:
    """Per domain, the loss and accuracy at each point."""
    return {domain: {metric: [getattr(p[domain], metric) for p in path] for metric in METRICS} for domain in path[0]}


def barriers(path: Sequence[Scores], ts: Sequence[float]) -> dict[str, dict[str, float]]:
    """Per domain: the loss barrier and accuracy drop (mean of end points), and both above the chord."""
    found = {}
    for domain, curve in curves(path).items():
        loss, accuracy = curve["loss"], curve["accuracy"]
        found[domain] = {
            "loss-barrier": loss_barrier(loss),
            "accuracy-drop": accuracy_drop(accuracy),
            "loss-above-chord": above_chord(loss, ts),
            "accuracy-below-chord": above_chord([-x for x in accuracy], ts),
        }
    return found


def align(a: State, b: State, num_heads: int, residual: bool) -> Alignment:
    """Weight-match ``b`` to ``a`` over the encoder's symmetries (every head included with ``residual``)."""
    return align_to(a, b, permutation_spec(a, num_heads, residual=residual))


def plot_barrier(path: str, ts: Sequence[float], modes: Mapping[str, Sequence[Scores]], title: str) -> None:
    """Loss (top) and accuracy (bottom) against t, one column per domain, one line per mode."""
    domains = list(next(iter(modes.values()))[0])
    fig, axes = plt.subplots(2, len(domains), figsize=(5.5 * len(domains), 7.5), squeeze=False, sharex=True)
    styles = [{"linestyle": "-", "marker": "o", "markersize": 4}, {"linestyle": "--", "marker": "x", "markersize": 5}]
    for column, domain in enumerate(domains):
        for (mode, points), style in zip(modes.items(), styles * len(modes)):
            curve = curves(points)[domain]
            found = barriers(points, ts)[domain]
            axes[0, column].plot(ts, curve["loss"], **style, label=f"{mode} (barrier {found['loss-barrier']:.3f})")
            axes[1, column].plot(
                ts, curve["accuracy"], **style, label=f"{mode} (drop {100 * found['accuracy-drop']:.1f} pts)"
            )
        axes[0, column].set_title(f"{domain}: test loss")
        axes[1, column].set_title(f"{domain}: test accuracy")
        axes[0, column].set_ylabel("cross-entropy")
        axes[1, column].set_ylabel("accuracy")
        axes[1, column].set_xlabel("t  (model = (1 - t) A + t B)")
        for row in range(2):
            axes[row, column].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
