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
  the round, the client and the key (``MergeContext.numpy_generator``), not by the order replies arrived in.

Task arithmetic and DARE read each client once, adding into one float32 buffer per key. TIES and DARE-TIES merge
a key BLOCK entries at a time: every client's sparsified delta of the block is kept (in cache) while the signs are
elected, then averaged, so each client is read once per key; TIES first finds each client's exact trim threshold
over the whole tensor (one more read, and a selection). Work buffers are reused across keys and blocks: a fresh
temporary of a large tensor costs more in page faults than the arithmetic on it. TIES' results are bit-identical
to merging whole tensors (tests/test_task_vectors.py keeps that version as the reference). DARE draws one random
byte per entry from numpy's PCG64, about 5x cheaper than torch.rand's float, with an exact drop rate (``drop_mask``).
Integer tensors must agree and pass through, as in FedAvg.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from strategies.aggregation import UpdateError, weighted_mean
from strategies.update import Clients, ClientUpdate, MergeContext, State

BLOCK = 1 << 16  # entries of a key merged at a time (256 KiB per float32 buffer); a multiple of 8 (DARE's random bytes)

Sparsify = Callable[[ClientUpdate, str, torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]
"""(client, key, flat float32 global value) -> a function that sparsifies, in place, the client's delta of that key
one block after the other (blocks of BLOCK entries, in order)."""


def task_arithmetic(global_state: State, clients: Clients, context: MergeContext, *, lambda_: float) -> dict[str, torch.Tensor]:
    """global + lambda * (weighted mean of the clients' states - global), key by key."""
    mean = weighted_mean((c.state, c.weight) for c in clients)
    return {k: torch.lerp(global_state[k].to(v.dtype), v, lambda_) if v.is_floating_point() else v for k, v in mean.items()}


def dare(global_state: State, clients: Clients, context: MergeContext, *, drop: float, lambda_: float) -> dict[str, torch.Tensor]:
    """global + lambda * weighted mean of the randomly dropped and rescaled deltas; one pass over the clients."""
    sums: dict[str, torch.Tensor] = {}
    totals: dict[str, float] = {}
    block = torch.empty(BLOCK)
    for client in clients:
        for key, value in float_items(client):
            base = flat32(global_state[key])
            if key not in sums:
                sums[key] = torch.zeros(base.numel())
                totals[key] = 0.0
            add_dropped(sums[key], value.reshape(-1), base, client.weight, masks(client, key, drop, context), block)
            totals[key] += client.weight
    rescale = 1.0 / (1.0 - drop)  # once per key, on the sum, rather than on every survivor
    merged = {k: moved(global_state[k], s, lambda_ * rescale / totals[k]) for k, s in sums.items()}
    merged.update(integers(clients))
    return merged


def add_dropped(sums: torch.Tensor, value: torch.Tensor, base: torch.Tensor, weight: float, mask: Callable[[int], torch.Tensor] | None, block: torch.Tensor) -> None:
    """sums += weight * mask * (value - base) (no mask: drop 0), a block at a time so that the delta never leaves the cache."""
    for start in range(0, base.numel(), BLOCK):
        stop = min(start + BLOCK, base.numel())
        delta = delta_into(block[: stop - start], value[start:stop], base[start:stop])
        if mask is None:
            sums[start:stop].add_(delta, alpha=weight)
        else:
            sums[start:stop].addcmul_(mask(stop - start), delta, value=weight)


def ties(global_state: State, clients: Clients, context: MergeContext, *, density: float, lambda_: float) -> dict[str, torch.Tensor]:
    """Trim, elect, disjoint mean (TIES-Merging), per key, then global + lambda * the merged delta."""
    magnitudes = Scratch()

    def trimmer(client: ClientUpdate, key: str, base: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        delta = delta_into(magnitudes.take(base.numel()), client.state[key].reshape(-1), base)
        return trim(kth_largest(delta.abs_().numpy(), math.ceil(density * base.numel())))

    return sign_consensus(global_state, clients, trimmer, lambda_)


def dare_ties(global_state: State, clients: Clients, context: MergeContext, *, drop: float, lambda_: float) -> dict[str, torch.Tensor]:
    """DARE's random drop and rescale in place of TIES' trim, then TIES' sign election and disjoint mean."""

    def sparsifier(client: ClientUpdate, key: str, base: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        mask = masks(client, key, drop, context)
        return (lambda delta: delta) if mask is None else (lambda delta: delta.mul_(mask(delta.numel())))

    # Rescaling every survivor by 1 / (1 - drop) scales the elected mass and the disjoint mean alike: done once, with lambda.
    return sign_consensus(global_state, clients, sparsifier, lambda_ / (1.0 - drop))


def sign_consensus(global_state: State, clients: Clients, sparsify: Sparsify, lambda_: float) -> dict[str, torch.Tensor]:
    """For every key: elect each coordinate's sign by the weighted sum of the sparsified deltas, then average
    (weighted) only the nonzero values of that sign. A coordinate whose mass is exactly 0 keeps the global value."""
    merged: dict[str, torch.Tensor] = {}
    members_of = keys_of(clients)
    size = min(BLOCK, max((global_state[key].numel() for key in members_of), default=0))  # made once: fresh pages fault
    rows = list(torch.empty(len(clients), size).unbind())  # listed once: iterating a tensor unbinds it each time
    work = list(torch.empty(4, size).unbind())  # mass (then elected signs), agreement, total, count
    for key, members in members_of.items():
        base = flat32(global_state[key])
        sparsifiers = [sparsify(client, key, base) for client in members]
        values = [client.state[key].reshape(-1) for client in members]
        merged[key] = consensus(global_state[key], base, values, [c.weight for c in members], sparsifiers, lambda_, rows, work)
    merged.update(integers(clients))
    return merged


def consensus(global_value: torch.Tensor, base: torch.Tensor, values: list[torch.Tensor], weights: list[float],
              sparsifiers: list[Callable[[torch.Tensor], torch.Tensor]], lambda_: float, rows: list[torch.Tensor], work: list[torch.Tensor]) -> torch.Tensor:
    """One key's sign consensus, block by block: the clients' sparsified deltas of a block are kept (one of ``rows``
    each) between the election and the mean, so each client is read once."""
    merged = torch.empty(global_value.shape, dtype=global_value.dtype)
    for start in range(0, base.numel(), BLOCK):
        stop = min(start + BLOCK, base.numel())
        deltas = [sparsify(delta_into(row[: stop - start], value[start:stop], base[start:stop])) for row, value, sparsify in zip(rows, values, sparsifiers)]
        total = disjoint_mean(deltas, weights, [w[: stop - start] for w in work])
        into_global(merged.view(-1)[start:stop], base[start:stop], total, lambda_)
    return merged


def disjoint_mean(deltas: list[torch.Tensor], weights: list[float], work: list[torch.Tensor]) -> torch.Tensor:
    """Per coordinate, the weighted mean of the nonzero deltas whose sign is the sign of their weighted sum (0 where
    none). A delta agrees where delta x elected > 0: the product is exact (the sign is -1, 0 or 1), and comparing
    it into a float tensor gives the agreement as 1.0 / 0.0 without a boolean tensor (slow to mix in torch)."""
    mass, agrees, total, count = work
    torch.mul(deltas[0], weights[0], out=mass)  # adding into zeros would differ only by the sign of a zero mass, which elects 0 either way
    for delta, weight in zip(deltas[1:], weights[1:]):
        mass.add_(delta, alpha=weight)
    elected = mass.sign_()
    total.zero_()  # adding into +0 keeps a coordinate that no client agrees on at +0
    for index, (delta, weight) in enumerate(zip(deltas, weights)):
        torch.gt(torch.mul(delta, elected, out=agrees), 0, out=agrees)
        if index == 0:
            torch.mul(agrees, weight, out=count)
        else:
            count.add_(agrees, alpha=weight)
        total.addcmul_(agrees, delta, value=weight)  # the same float32 rounding as total.add_(delta * agrees, alpha=weight)
    return total.div_(count.clamp_(min=torch.finfo(count.dtype).tiny))


def trim_threshold(delta: torch.Tensor, density: float) -> float:
    """The magnitude of the ceil(density * n)-th largest entry: keeping |delta| >= it keeps the top density
    (more only on ties)."""
    return kth_largest(delta.float().abs().numpy().ravel(), math.ceil(density * delta.numel()))


def kth_largest(magnitudes: np.ndarray, keep: int) -> float:
    """The keep-th largest of float32 ``magnitudes`` (reordered in place, no copy); 0 when keep covers them all.
    Non-negative float32 values order as their bit patterns do, and numpy selects among uint32 about 3x faster
    than among float32 (whose comparisons must place NaNs), and about 10x faster than torch.kthvalue."""
    n = magnitudes.size
    if keep >= n:
        return 0.0
    magnitudes.view(np.uint32).partition(n - keep)
    return float(magnitudes[n - keep])


def trim(threshold: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Zero, in place, the entries of magnitude below ``threshold`` (a float32 value). hardshrink zeroes
    |x| <= its bound in one pass; the bound is the float32 just below the threshold, so |x| >= threshold stays."""
    if threshold == 0:
        return lambda delta: delta
    bound = float(np.nextafter(np.float32(threshold), np.float32(0)))
    return lambda delta: torch.hardshrink(delta, bound, out=delta)


def masks(client: ClientUpdate, key: str, drop: float, context: MergeContext) -> Callable[[int], torch.Tensor] | None:
    """The client's DARE mask of ``key``, one block after the other: ``mask(count)`` gives the next count 0/1 keep
    factors (``drop_mask``); None for drop 0. The draws follow the client, key and round (``context.numpy_generator``);
    the uniforms that settle edge bytes come from the same stream 2**64 draws ahead, so the mask of a key does not
    depend on BLOCK."""
    if drop == 0:
        return None
    draws = context.numpy_generator(client.identity, key)
    edges = context.numpy_generator(client.identity, key)
    edges.bit_generator.advance(2**64)
    return lambda count: torch.from_numpy(drop_mask(draws, edges, count, drop))


def drop_mask(draws: np.random.Generator, edges: np.random.Generator, count: int, drop: float) -> np.ndarray:
    """``count`` float32 keep factors: 0 with probability ``drop``, else 1. One random byte per entry, the
    raw 64-bit output of ``draws`` viewed as bytes (a float each costs 4-10x more): dropped below byte
    floor(256 drop); the 1/256 of entries whose byte equals it take a uniform from ``edges``, dropped below the
    fraction left, so that P(drop) is ``drop`` exactly (to float64)."""
    bytes_ = draws.bit_generator.random_raw(-(-count // 8)).view(np.uint8)[:count]
    level = drop * 256
    cut = math.floor(level)
    factors = np.empty(count, dtype=np.float32)
    np.greater_equal(bytes_, cut, out=factors)  # straight into float32: a boolean array and a cast cost more
    if level > cut:
        edge = np.flatnonzero(bytes_ == cut)
        factors[edge] = edges.random(edge.size) >= level - cut
    return factors


def delta_into(out: torch.Tensor, value: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """out = value (as float32) - base, without a float32 copy of a float32 value."""
    if value.dtype == torch.float32:
        return torch.sub(value, base, out=out)
    return out.copy_(value).sub_(base)


def into_global(out: torch.Tensor, base: torch.Tensor, delta: torch.Tensor, lambda_: float) -> torch.Tensor:
    """out = base + lambda * delta, rounded to out's dtype (scaled's arithmetic, written into ``out``)."""
    if out.dtype == torch.float32:
        return torch.add(base, delta, alpha=lambda_, out=out)
    return out.copy_(torch.add(base, delta, alpha=lambda_))


def moved(global_value: torch.Tensor, delta: torch.Tensor, lambda_: float) -> torch.Tensor:
    """global + lambda * a flat float32 delta, written over the delta (no new buffer), in the global's shape and dtype."""
    return torch.add(flat32(global_value), delta, alpha=lambda_, out=delta).view(global_value.shape).to(global_value.dtype)


def flat32(value: torch.Tensor) -> torch.Tensor:
    return value.float().reshape(-1)


class Scratch:
    """One float32 buffer reused for every key, grown when a key needs more."""

    def __init__(self) -> None:
        self.buffer = torch.empty(0)

    def take(self, count: int) -> torch.Tensor:
        if self.buffer.numel() < count:
            self.buffer = torch.empty(count)
        return self.buffer[:count]


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
