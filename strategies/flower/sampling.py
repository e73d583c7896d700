"""Which clients train in a round when only K of them do (cross-device federated learning).

The draw depends on the run's seed and the round only, never on Flower's node ids (new in every run), so the
same seed samples the same clients, and a resumed round samples what the uninterrupted one did. When K allows,
every domain is represented: one client per domain first, then the rest uniformly among the others; a domain
absent from a round would leave its head untrained and the encoder pulled towards the other domains only.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def client_order(name: str) -> tuple[str, int]:
    """Sort key of a client name "<domain>-<partition>": by domain, then partition as a number (bio-2 < bio-10)."""
    domain, _, part = name.rpartition("-")
    return (domain, int(part)) if domain and part.isdigit() else (name, -1)


def sample_clients(names: Mapping[int, str], count: int, seed: int, server_round: int) -> list[int]:
    """`count` of the nodes (node id -> client name), in client order; all of them when `count` is not smaller."""
    nodes = sorted(names, key=lambda node: client_order(names[node]))
    if count >= len(nodes):
        return nodes
    if count < 1:
        raise ValueError(f"clients per round {count}: expected at least 1")
    rng = np.random.default_rng([seed, server_round])
    by_domain: dict[str, list[int]] = {}
    for node in nodes:
        by_domain.setdefault(client_order(names[node])[0], []).append(node)
    chosen: list[int] = []
    if count >= len(by_domain):
        chosen = [members[int(rng.integers(len(members)))] for _, members in sorted(by_domain.items())]
    rest = [node for node in nodes if node not in set(chosen)]
    picks = rng.choice(len(rest), size=count - len(chosen), replace=False)
    chosen += [rest[int(i)] for i in picks]
    return sorted(chosen, key=lambda node: client_order(names[node]))
