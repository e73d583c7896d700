"""Byzantine-robust merge rules: coordinate-wise median, trimmed mean, norm clipping and multi-Krum, per key and
head-aware.

A few clients may send anything (a bug, a diverged run, an attacker scaling its update by 1e6); FedAvg's mean
follows any one of them arbitrarily far. These rules bound what a minority can do:

* median and trimmed mean (Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
  Rates", ICML 2018): per coordinate, the median of the senders' values, or their mean after dropping the
  floor(beta n) smallest and largest. Both are unweighted (a client's example count is what it claims, so an
  attacker could claim any): with two senders both are their plain mean (np.median's even-count rule).
* norm clipping (Sun et al., "Can You Really Backdoor Federated Learning?", 2019): each client's delta (its
  weights minus the global ones, over every float key it sent) is scaled down to L2 norm ``bound`` (0: the
  round's median delta norm), then FedAvg's weighted mean of the clipped deltas is added to the global model.
* multi-Krum (Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent",
  NeurIPS 2017; El Mhamdi et al., "The Hidden Vulnerability of Distributed Learning in Byzantium", ICML 2018):
  the FedAvg of the n - f clients whose updates lie closest to their n - f - 2 nearest neighbours.

Every key is merged over exactly the clients that sent it, so a domain head only over its domain's clients;
keys nobody sent are absent (the caller keeps their global value); integer tensors must agree and pass through.
Median and trimmed mean hold every sender's values of a key and sort them in blocks of ``CHUNK`` coordinates;
clipping reads every client twice (norms, then sums); Krum reads the clients twice (distances, then the mean).
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Iterator, Sequence

import torch

from strategies.aggregation import StreamingMean
from strategies.task_vectors import float_items, integers, keys_of, scaled
from strategies.update import Clients, ClientUpdate, MergeContext, State

_LOG = logging.getLogger(__name__)

CHUNK = 1 << 20  # coordinates per block: the senders' stacked copies of a key take n x 4 MiB, whatever its size


def median(global_state: State, clients: Clients, context: MergeContext) -> dict[str, torch.Tensor]:
    """Per key, the coordinate-wise median of its senders' values, unweighted; an even count takes the mean of
    the two middle values (np.median), so two senders give their plain mean."""
    merged = {key: middle_mean([c.state[key] for c in members], (len(members) - 1) // 2) for key, members in keys_of(clients).items()}
    merged.update(integers(clients))
    return merged


def trimmed_mean(global_state: State, clients: Clients, context: MergeContext, *, beta: float) -> dict[str, torch.Tensor]:
    """Per key and coordinate, the unweighted mean of its n senders' values without the floor(beta n) smallest
    and the floor(beta n) largest: the plain mean where beta n < 1 (few senders, as a head's often are)."""
    merged = {key: middle_mean([c.state[key] for c in members], trimmed_count(beta, len(members))) for key, members in keys_of(clients).items()}
    merged.update(integers(clients))
    return merged


def trimmed_count(beta: float, n: int) -> int:
    """floor(beta n) values dropped at each end, at least one kept. The 1e-9: 0.29 x 100 is 28.999999999999996."""
    return min(math.floor(beta * n + 1e-9), (n - 1) // 2)


def middle_mean(values: Sequence[torch.Tensor], trim: int) -> torch.Tensor:
    """Coordinate-wise mean of the sorted values without ``trim`` at each end, in the first value's dtype."""
    n = len(values)
    out = torch.empty(values[0].numel(), dtype=torch.promote_types(values[0].dtype, torch.float32))
    for part, block in blocks(values):
        out[part] = block.sort(dim=0).values[trim : n - trim].mean(dim=0)
    return out.reshape(values[0].shape).to(values[0].dtype)


def blocks(values: Sequence[torch.Tensor]) -> Iterator[tuple[slice, torch.Tensor]]:
    """The flattened values stacked (one row per value, float32 or wider) over ``CHUNK`` coordinates at a time."""
    flat = [v.reshape(-1) for v in values]
    dtype = torch.promote_types(values[0].dtype, torch.float32)
    total = flat[0].numel()
    for start in range(0, total, CHUNK):
        part = slice(start, min(start + CHUNK, total))
        yield part, torch.stack([v[part].to(dtype) for v in flat])


def clip(global_state: State, clients: Clients, context: MergeContext, *, bound: float) -> dict[str, torch.Tensor]:
    """global + weighted mean of the deltas, each first scaled to L2 norm <= ``bound`` (0: the median norm).

    A client's norm is over every float key it sent (encoder and its head together), so one factor scales its
    whole update and the direction it sent is kept. The factor is noted per client as ``clip-scale``."""
    norms = [delta_norm(global_state, client) for client in clients]
    limit = bound if bound > 0 else statistics.median(norms)
    _LOG.info("clip: round %d bound %.4g (delta norms %s)", context.server_round, limit, ", ".join(f"{n:.4g}" for n in norms))
    sums: dict[str, torch.Tensor] = {}
    totals: dict[str, float] = {}
    for client, norm in zip(clients, norms):
        scale = limit / norm if norm > limit else 1.0
        context.notes.setdefault(client.name, {})["clip-scale"] = scale
        for key, value in float_items(client):
            delta = value.float() - global_state[key].float()
            if key in sums:
                sums[key].add_(delta, alpha=scale * client.weight)
                totals[key] += client.weight
            else:
                sums[key] = delta.mul_(scale * client.weight)
                totals[key] = client.weight
    merged = {k: scaled(global_state[k], s.div_(totals[k]), 1.0) for k, s in sums.items()}
    merged.update(integers(clients))
    return merged


def delta_norm(global_state: State, client: ClientUpdate) -> float:
    """L2 norm of the client's delta over all the float keys it sent."""
    squares = sum(float((v.float() - global_state[k].float()).pow_(2).sum(dtype=torch.float64)) for k, v in float_items(client))
    return math.sqrt(squares)


def krum(global_state: State, clients: Clients, context: MergeContext, *, f: int) -> dict[str, torch.Tensor]:
    """Multi-Krum, head-aware: the weighted mean, key by key, of the clients Krum selects.

    Clients are scored on the keys every one of them sent (the shared encoder): each by the summed squared
    distances to its n - f - 2 nearest others, and the n - f lowest scores are selected. Every key is then
    averaged over its senders among the selected. Keys whose senders were all left out (a whole domain's head,
    as happens when the domains' encoders drift apart) run the same selection among their own senders, on their
    own keys: a domain left out of the encoder still has its head merged, by its own clients. Without a key all
    clients sent, every group of keys with the same senders selects on its own.

    Small n: the neighbour count is clamped to 1..n-1 and at least one client is selected (never an index
    error), and clients whose score ties the last selected one are selected too, as no score tells them apart.
    Two clients always tie (each one's score is the single distance between them), so with two senders Krum is
    FedAvg for any f. Its guarantee (at most f of n Byzantine) needs n >= 2f + 3. Noted per client:
    ``krum-selected``, whether its values entered the merge of every key it sent.
    """
    position = {id(c): i for i, c in enumerate(clients)}
    groups: dict[tuple[int, ...], list[str]] = {}
    for key, members in keys_of(clients).items():
        groups.setdefault(tuple(position[id(c)] for c in members), []).append(key)
    everyone = tuple(range(len(clients)))
    shared = select(clients, groups[everyone], f) if everyone in groups else None
    chosen: dict[int, list[str]] = {}
    for senders, keys in groups.items():
        members = [i for i in senders if shared is not None and shared[i]]
        if not members:
            if shared is not None:
                _LOG.info("krum: round %d no selected client sent %s: selecting among its %d senders", context.server_round, keys[0], len(senders))
            members = [i for i, kept in zip(senders, select([clients[i] for i in senders], keys, f)) if kept]
        for i in senders:
            if i in members:
                chosen.setdefault(i, []).extend(keys)
    mean = StreamingMean()
    for i, client in enumerate(clients):
        keys = chosen.get(i, [])
        context.notes.setdefault(client.name, {})["krum-selected"] = len(keys) == len(float_items(client))
        if keys:
            mean.add({k: client.state[k] for k in keys}, client.weight)
    _LOG.info("krum: round %d selected %s", context.server_round, ", ".join(c.name for c in clients if context.notes[c.name]["krum-selected"]))
    merged = mean.result() if mean.num_states else {}
    merged.update(integers(clients))
    return merged


def select(clients: Sequence[ClientUpdate], keys: Sequence[str], f: int) -> list[bool]:
    """Which clients Krum keeps: the max(n - f, 1) lowest scores over ``keys``, and any that tie the last kept."""
    n = len(clients)
    distances = squared_distances([[c.state[k] for k in keys] for c in clients])
    neighbours = min(max(n - f - 2, 1), n - 1)
    # Each sorted row starts with a zero (the distance to itself, or a tie with it): the next ones are the others.
    scores = distances.sort(dim=1).values[:, 1 : neighbours + 1].sum(dim=1)
    last = scores.sort().values[max(n - f, 1) - 1]
    return [bool(s <= last) for s in scores]


def squared_distances(states: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """n x n squared L2 distances between the clients' values (each a list of tensors, same keys in order), float64
    sums of direct differences (no ||a||^2 + ||b||^2 - 2ab cancellation); exactly symmetric, so equal distances
    give equal scores."""
    n = len(states)
    upper = torch.zeros(n, n, dtype=torch.float64)
    for values in zip(*states):
        for _, block in blocks(values):
            for i in range(n - 1):
                upper[i, i + 1 :] += (block[i + 1 :] - block[i]).pow_(2).sum(dim=1, dtype=torch.float64)
    return upper + upper.T
