"""Merge rules over task vectors: task arithmetic, TIES, DARE and DARE-TIES, per key and head-aware.

A client's task vector (delta) is its state minus the current global state. Each rule combines the deltas
of the clients that sent a key, scales the result by ``lambda`` and adds it to the global value:

* task arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023): the weighted mean delta.
  With lambda = 1 this is FedAvg exactly (``torch.lerp`` returns its end point at weight 1); lambda is a
  server step size as in FedOpt.
* TIES (Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023): trim each
  delta to its ``density`` largest magnitudes, elect each coordinate's sign by the summed trimmed mass, and
  average only the values that agree with it (disjoint mean). Trimming is per tensor, as mergekit does (the
  paper trims the flattened model); masses and means are weighted by the clients' examples.
* DARE (Yu et al., "Language Models are Super Mario", ICML 2024): drop each delta coordinate with
  probability ``drop``, rescale the survivors by 1 / (1 - drop), then average (``dare``) or merge the
  sparsified deltas the TIES way (``dare-ties``, as mergekit's dare_ties). Draws are seeded by the run seed,
  the round, the client and the key (``MergeContext.generator``), not by the order replies arrived in.

Task arithmetic and DARE read each client once, adding into one float32 buffer per key. TIES and DARE-TIES go
over the clients twice per key (elect, then average), keeping per-key buffers only; TIES keeps each client's
trim threshold from the first pass. Integer tensors must agree and pass through, as in FedAvg.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from strategies.aggregation import UpdateError, weighted_mean
from strategies.update import Clients, ClientUpdate, MergeContext, State

Sparsify = Callable[[ClientUpdate, str, torch.Tensor], torch.Tensor]


def task_arithmetic(global_state: State, clients: Clients, context: MergeContext, *, lambda_: float) -> dict[str, torch.Tensor]:
    """global + lambda * (weighted mean of the clients' states - global), key by key."""
    mean = weighted_mean((c.state, c.weight) for c in clients)
    return {k: torch.lerp(global_state[k].to(v.dtype), v, lambda_) if v.is_floating_point() else v for k, v in mean.items()}


def dare(global_state: State, clients: Clients, context: MergeContext, *, drop: float, lambda_: float) -> dict[str, torch.Tensor]:
    """global + lambda * weighted mean of the randomly dropped and rescaled deltas; one pass over the clients."""
    sums: dict[str, torch.Tensor] = {}
    totals: dict[str, float] = {}
    for client in clients:
        for key, value in float_items(client):
            delta = dropped(client, key, value.float() - global_state[key].float(), drop, context)
            if key in sums:
                sums[key].add_(delta, alpha=client.weight)
                totals[key] += client.weight
            else:
                sums[key] = delta.mul_(client.weight)
                totals[key] = client.weight
    merged = {k: scaled(global_state[k], s.div_(totals[k]), lambda_) for k, s in sums.items()}
    merged.update(integers(clients))
    return merged


def ties(global_state: State, clients: Clients, context: MergeContext, *, density: float, lambda_: float) -> dict[str, torch.Tensor]:
    """Trim, elect, disjoint mean (TIES-Merging), per key, then global + lambda * the merged delta."""
    thresholds: dict[tuple[str, str], float] = {}

    def trimmed(client: ClientUpdate, key: str, delta: torch.Tensor) -> torch.Tensor:
        if (client.identity, key) not in thresholds:
            thresholds[client.identity, key] = trim_threshold(delta, density)
        return delta.masked_fill_(delta.abs() < thresholds[client.identity, key], 0.0)

    return sign_consensus(global_state, clients, trimmed, lambda_)


def dare_ties(global_state: State, clients: Clients, context: MergeContext, *, drop: float, lambda_: float) -> dict[str, torch.Tensor]:
    """DARE's random drop and rescale in place of TIES' trim, then TIES' sign election and disjoint mean."""

    def sparsified(client: ClientUpdate, key: str, delta: torch.Tensor) -> torch.Tensor:
        return dropped(client, key, delta, drop, context)

    return sign_consensus(global_state, clients, sparsified, lambda_)


def sign_consensus(global_state: State, clients: Clients, sparsify: Sparsify, lambda_: float) -> dict[str, torch.Tensor]:
    """For every key: elect each coordinate's sign by the weighted sum of the sparsified deltas, then average
    (weighted) only the nonzero values of that sign. A coordinate whose mass is exactly 0 keeps the global value.
    ``sparsify`` must give the same result when called twice for one client and key."""
    merged: dict[str, torch.Tensor] = {}
    for key, members in keys_of(clients).items():
        base = global_state[key].float()
        mass = torch.zeros_like(base)
        for client in members:
            mass.add_(sparsify(client, key, client.state[key].float() - base), alpha=client.weight)
        elected = mass.sign_()
        total = torch.zeros_like(base)
        counted = torch.zeros_like(base)
        for client in members:
            delta = sparsify(client, key, client.state[key].float() - base)
            agrees = (delta.sign() == elected) & (delta != 0)
            total.add_(delta.masked_fill_(~agrees, 0.0), alpha=client.weight)
            counted.add_(agrees.to(counted.dtype), alpha=client.weight)
        merged[key] = scaled(global_state[key], total.div_(counted.clamp_(min=torch.finfo(counted.dtype).tiny)), lambda_)
    merged.update(integers(clients))
    return merged


def trim_threshold(delta: torch.Tensor, density: float) -> float:
    """The magnitude of the ceil(density * n)-th largest entry: keeping |delta| >= it keeps the top density
    (more only on ties). numpy's introselect is about 4x faster than torch.kthvalue here."""
    n = delta.numel()
    keep = math.ceil(density * n)
    if keep >= n:
        return 0.0
    magnitudes = delta.abs().numpy().ravel()
    return float(np.partition(magnitudes, n - keep)[n - keep])


def dropped(client: ClientUpdate, key: str, delta: torch.Tensor, drop: float, context: MergeContext) -> torch.Tensor:
    """``delta`` (modified in place) with each entry zeroed with probability ``drop`` and survivors scaled by
    1 / (1 - drop); the same client, key and round always draw the same mask."""
    if drop == 0:
        return delta
    kept = torch.rand(delta.shape, generator=context.generator(client.identity, key)) >= drop
    return delta.mul_(kept).div_(1.0 - drop)


def scaled(base: torch.Tensor, delta: torch.Tensor, lambda_: float) -> torch.Tensor:
    """base + lambda * delta, in the base's dtype."""
    return base.to(torch.float32, copy=True).add_(delta, alpha=lambda_).to(base.dtype)


def float_items(client: ClientUpdate) -> list[tuple[str, torch.Tensor]]:
    return [(k, v) for k, v in client.state.items() if v.is_floating_point()]


def keys_of(clients: Clients) -> dict[str, list[ClientUpdate]]:
    """Every float key some client sent, in first-seen order, with the clients that sent it."""
    members: dict[str, list[ClientUpdate]] = {}
    for client in clients:
        for key, _ in float_items(client):
            members.setdefault(key, []).append(client)
    return members


def integers(clients: Clients) -> dict[str, torch.Tensor]:
    """Integer tensors (buffers such as position ids) pass through; clients must agree on them."""
    found: dict[str, torch.Tensor] = {}
    for client in clients:
        for key, value in client.state.items():
            if value.is_floating_point():
                continue
            if key in found and not torch.equal(found[key], value):
                raise UpdateError(f"{client.name}: integer tensor '{key}' differs from other clients (integers are not averaged)")
            found.setdefault(key, value.clone())
    return found
