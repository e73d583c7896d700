"""Merge rules Model Stock and Model Breadcrumbs, per key and head-aware.

A client's delta is its state minus the current global state. Both rules go over the clients that sent a key
(the encoder: all of them; a head: only its domain's clients) and return merged values only for keys some client
sent; integer tensors must agree and pass through, as in FedAvg. The merged value keeps the global tensor's dtype.

* Model Stock (Jang, Yun, Han, "Model Stock: All we need is just a few fine-tuned models", ECCV 2024): the
  fine-tuned weights of N models lie on a sphere around a centre that is closer to the pretrained weights than
  their average is, so the merge moves from the anchor (here: the global state) only part of the way to the
  average: ``merged = t * mean + (1 - t) * global`` with ``t = N cos / (1 + (N - 1) cos)``, where ``cos`` is the
  cosine of the angle between the deltas. The paper computes it per layer; here it is per tensor key, and with
  more than two clients ``cos`` is the mean pairwise cosine (as mergekit does). No options: t is read off the
  deltas' geometry.
* Model Breadcrumbs (Davari and Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse
  Masks", ECCV 2024): mask each delta per tensor, dropping its ``outliers`` fraction of largest magnitudes (large
  task-specific changes that interfere with the other tasks) and everything below the next ``density`` fraction
  (negligible perturbations), then task arithmetic on the masked deltas: global + lambda * their weighted mean.
  With ``outliers = 0`` and ``density = 1`` it is task arithmetic.

Both read each client once per key and keep per-key buffers only (two for Model Stock, one for Breadcrumbs).
"""

from __future__ import annotations

import math

import torch

from strategies.task_vectors import integers, keys_of, scaled
from strategies.update import Clients, MergeContext, State


def model_stock(global_state: State, clients: Clients, context: MergeContext) -> dict[str, torch.Tensor]:
    """Per key: global + t * (weighted mean of the clients' weights - global), t from the deltas' mean cosine.

    The mean is weighted by the clients' examples, as FedAvg's is (the paper averages uniformly; with equal
    weights the two agree); the cosines are unweighted, since they measure the geometry of the deltas, not how
    much data stands behind each. ``cos`` is clipped to [0, 1], so t stays in [0, 1]: the paper's derivation
    assumes deltas at most 90 degrees apart, and a negative ``cos`` would make t negative or its denominator 0.
    A delta of norm 0 (a client that did not change the key) counts as cosine 0 with every other delta.
    A key only one client sent has no angle to measure (the formula is undefined for N = 1), so it falls back to
    the mean, that client's own weights (t = 1), which is what FedAvg would give.
    """
    merged: dict[str, torch.Tensor] = {}
    for key, members in keys_of(clients).items():
        base = global_state[key].float()
        mean, unit_sum, nonzero = mean_and_unit_sum(base, key, members)
        t = stock_weight(mean_pairwise_cosine(unit_sum, nonzero, len(members)), len(members)) if len(members) > 1 else 1.0
        merged[key] = torch.lerp(base, mean, t).to(global_state[key].dtype)  # lerp returns ``mean`` exactly at t = 1
    merged.update(integers(clients))
    return merged


def mean_and_unit_sum(base: torch.Tensor, key: str, members: Clients) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One pass over the clients that sent ``key``: the weighted mean of their values, the sum of their deltas
    scaled to unit norm, and how many deltas were nonzero (a zero delta adds nothing to the sum)."""
    total = torch.zeros_like(base)
    unit_sum = torch.zeros_like(base)
    weights = 0.0
    nonzero = 0
    for client in members:
        value = client.state[key].float()
        total.add_(value, alpha=client.weight)
        weights += client.weight
        delta = value - base
        norm = float(torch.linalg.vector_norm(delta))
        if norm > 0:
            unit_sum.add_(delta, alpha=1.0 / norm)
            nonzero += 1
    return total.div_(weights), unit_sum, nonzero


def mean_pairwise_cosine(unit_sum: torch.Tensor, nonzero: int, n: int) -> float:
    """The mean of cos(d_i, d_j) over the n (n - 1) ordered pairs i != j, from the sum of the unit deltas u_i:
    |sum u_i|^2 = sum |u_i|^2 + sum_{i != j} u_i . u_j, where |u_i|^2 is 1 for each nonzero delta and 0 for a
    zero one. One buffer per key instead of all n deltas at once; the square is summed in float64."""
    squared = float(torch.linalg.vector_norm(unit_sum, dtype=torch.float64)) ** 2
    return (squared - nonzero) / (n * (n - 1))


def stock_weight(cos: float, n: int) -> float:
    """The paper's interpolation weight t = n cos / (1 + (n - 1) cos), with cos clipped to [0, 1]: t = 0 keeps
    the anchor (orthogonal deltas: averaging already cancels their noise), t = 1 takes the mean (equal deltas)."""
    cos = min(max(cos, 0.0), 1.0)
    return n * cos / (1 + (n - 1) * cos)


def breadcrumbs(
    global_state: State, clients: Clients, context: MergeContext, *, density: float, outliers: float, lambda_: float
) -> dict[str, torch.Tensor]:
    """Per key: global + lambda * the weighted mean (by examples) of the clients' masked deltas.

    Each delta is masked per tensor (as TIES trims per tensor here): ranked by magnitude, the top
    ``floor(outliers * n)`` entries are dropped, the next ``ceil(density * n)`` kept, the rest (the smallest)
    dropped. Rounding matches mergekit for the outliers (so a small tensor loses no entry to a 1% cut) and this
    repository's TIES for the kept count (ceil: a tiny tensor keeps at least one). The cuts are thresholds on
    the magnitude, so ties at a cut keep every tied entry: results do not depend on the order of the entries.
    When outliers + density > 1 the band just reaches the smallest entry (mergekit would instead drop fewer
    outliers to keep ``density``).
    """
    if not (0.0 <= outliers < 1.0 and 0.0 <= density <= 1.0):
        raise ValueError(f"breadcrumbs needs 0 <= outliers < 1 and 0 <= density <= 1, got outliers={outliers}, density={density}")
    merged: dict[str, torch.Tensor] = {}
    for key, members in keys_of(clients).items():
        base = global_state[key].float()
        total = torch.zeros_like(base)
        weights = 0.0
        for client in members:
            delta = client.state[key].float() - base
            total.add_(masked(delta, density, outliers), alpha=client.weight)
            weights += client.weight
        merged[key] = scaled(global_state[key], total.div_(weights), lambda_)
    merged.update(integers(clients))
    return merged


def masked(delta: torch.Tensor, density: float, outliers: float) -> torch.Tensor:
    """``delta`` (modified in place) with entries outside the kept magnitude band set to 0."""
    magnitudes = delta.abs()
    upper, lower = band(magnitudes.flatten(), density, outliers)
    return delta.masked_fill_((magnitudes > upper) | (magnitudes < lower), 0.0)


def band(magnitudes: torch.Tensor, density: float, outliers: float) -> tuple[float, float]:
    """(upper, lower): keeping ``lower <= |delta| <= upper`` drops the top floor(outliers * n) magnitudes and
    keeps the next ceil(density * n). upper is the largest magnitude left after the outliers (inf when none are
    dropped); lower is the smallest kept one (0 when the band reaches the bottom)."""
    n = magnitudes.numel()
    top = math.floor(outliers * n)
    bottom = min(n, top + math.ceil(density * n))  # rank (1 = largest) of the smallest kept entry
    if bottom <= top:  # nothing kept (density 0, or an empty tensor)
        return -math.inf, math.inf
    upper = kth_largest(magnitudes, top + 1) if top > 0 else math.inf
    lower = kth_largest(magnitudes, bottom) if bottom < n else 0.0
    return upper, lower


def kth_largest(values: torch.Tensor, k: int) -> float:
    """The k-th largest entry (k = 1: the maximum) of a 1-D tensor."""
    return float(torch.kthvalue(values, values.numel() - k + 1).values)
