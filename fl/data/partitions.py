"""Federated partitions of a domain's training set among its clients.

Non-IID client partitions follow the per-label Dirichlet recipe of Hsu, Qi and Brown, "Measuring the
Effects of Non-Identical Data Distribution for Federated Visual Classification" (2019).
"""
from __future__ import annotations

import math

import numpy as np

from fl.data.user_files import DataError


def parse_partition_scheme(scheme: str) -> tuple[str, float | None]:
    """Validate a partition scheme: ``"iid"`` -> ``("iid", None)``, ``"dirichlet:0.5"`` -> ``("dirichlet", 0.5)``."""
    if scheme == "iid":
        return "iid", None
    kind, sep, alpha_text = scheme.partition(":")
    if kind != "dirichlet" or not sep:
        raise DataError(f"partition scheme {scheme!r} is not 'iid' or 'dirichlet:ALPHA'")
    try:
        alpha = float(alpha_text)
    except ValueError:
        raise DataError(f"partition scheme {scheme!r} has alpha {alpha_text!r}; expected a positive number") from None
    if not (math.isfinite(alpha) and alpha > 0):
        raise DataError(f"partition scheme {scheme!r} has alpha {alpha_text!r}; expected a positive number")
    return kind, alpha


def partition(labels: np.ndarray, num_clients: int, scheme: str, seed: int) -> list[np.ndarray]:
    """Split example indices among ``num_clients``: every index in exactly one non-empty, sorted partition.

    ``"iid"`` deals a seeded shuffle into near-equal parts. ``"dirichlet:ALPHA"`` draws, for each label,
    client proportions from Dirichlet(ALPHA) and cuts that label's shuffled examples accordingly (small
    ALPHA: each client sees few labels). A client left empty then receives the last example of the
    largest partition, so the result stays deterministic by seed.
    """
    kind, alpha = parse_partition_scheme(scheme)
    labels = np.asarray(labels)
    if num_clients < 1:
        raise DataError(f"number of clients {num_clients!r} is not a positive integer")
    if num_clients > len(labels):
        raise DataError(f"number of clients {num_clients} exceeds the {len(labels)} examples to partition")
    rng = np.random.default_rng(seed)
    if kind == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(len(labels)), num_clients)]
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, alpha)))[:-1] * len(members)).astype(np.int64)
        for client, chunk in enumerate(np.split(members, cuts)):
            parts[client].extend(chunk.tolist())
    for client in range(num_clients):
        if not parts[client]:
            donor = max(range(num_clients), key=lambda c: len(parts[c]))
            parts[client].append(parts[donor].pop())
    return [np.sort(np.asarray(part, dtype=np.int64)) for part in parts]
