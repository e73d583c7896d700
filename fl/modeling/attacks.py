"""Simulated attackers: a measurement tool for what poisoned updates do to each merge rule.

``--attack KIND:COUNT`` makes COUNT clients, drawn with the run's seed, send poisoned training replies; the server
is told nothing (results.json names them). The kinds are the usual model-poisoning baselines of the robust
aggregation literature (Blanchard et al. 2017, arXiv 1703.02757; Fang et al. 2020, arXiv 1911.11815):

- ``scale:F:COUNT``: send global + F * delta (delta = trained weights - received weights): a boosted update;
- ``sign-flip[:F]:COUNT``: send global - F * delta (F defaults to 1): push the merge back up the loss;
- ``noise:SIGMA:COUNT``: send the trained weights plus Gaussian noise of std SIGMA, seeded;
- ``label-flip:COUNT``: train honestly on labels permuted by a fixed seeded derangement, then send normally.

Only weights in training replies are poisoned: statistics (Fisher, Gram matrices) and evaluation stay honest, and
the baselines (experts, multi-task, one-shot merges) never see an attacker. The functions here are pure, over state
dicts and label tensors; ``fl.federation.client`` calls them. Parsing a spec needs no torch (the command line's
``--help`` and checks import this module), so the tensor functions import it themselves.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

GRAMMAR = {
    "scale": "scale:F:COUNT",
    "sign-flip": "sign-flip[:F]:COUNT",
    "noise": "noise:SIGMA:COUNT",
    "label-flip": "label-flip:COUNT",
}
FIELDS = {"scale": (2,), "sign-flip": (1, 2), "noise": (2,), "label-flip": (1,)}  # fields after the kind


@dataclass(frozen=True)
class AttackSpec:
    kind: str  # 'scale', 'sign-flip', 'noise' or 'label-flip'
    count: int  # how many clients attack; at least one stays honest
    factor: float = 1.0  # F of scale and sign-flip, SIGMA of noise; unused by label-flip


MAX_FACTOR = 1e20  # far above any boosting attack (10-1000x), far below where a round's float32 sum overflows (3.4e38)


def parse_attack(text: str, num_clients: int) -> AttackSpec | None:
    """The spec of ``--attack`` (None when empty); ValueError with one line naming the value otherwise."""
    if not text:
        return None
    kind, *fields = text.split(":")
    if kind not in GRAMMAR:
        raise ValueError(f"--attack {text}: unknown kind '{kind}': expected one of {', '.join(GRAMMAR.values())}")
    if len(fields) not in FIELDS[kind]:
        raise ValueError(f"--attack {text}: expected {GRAMMAR[kind]}")
    try:
        count = int(fields[-1])
        factor = float(fields[0]) if len(fields) == 2 else 1.0
    except ValueError:
        raise ValueError(f"--attack {text}: expected {GRAMMAR[kind]} (F and SIGMA numbers, COUNT an integer)") from None
    if kind == "noise" and not (math.isfinite(factor) and factor >= 0):
        raise ValueError(f"--attack {text}: expected a finite SIGMA >= 0")
    if kind != "noise" and not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"--attack {text}: expected a finite F > 0")
    if factor > MAX_FACTOR:
        raise ValueError(f"--attack {text}: {'SIGMA' if kind == 'noise' else 'F'} {factor:g} would overflow a round's float32 sum; expected at most {MAX_FACTOR:g}")
    if not 1 <= count < num_clients:
        honest = f"at least one of the {num_clients} clients must stay honest"
        raise ValueError(f"--attack {text}: expected COUNT from 1 to {num_clients - 1}: {honest}")
    return AttackSpec(kind, count, factor)


def client_name(domain: str, partition_id: int) -> str:
    return f"{domain}-{partition_id}"


def draw_attackers(text: str, names: list[str], seed: int) -> list[str]:
    """The attacking clients among `names`, drawn with the run's seed: the same run, the same attackers."""
    spec = parse_attack(text, len(names))
    if spec is None:
        return []
    chosen = np.random.default_rng(seed).choice(len(names), size=spec.count, replace=False)
    return sorted(names[i] for i in chosen)


def poison(
    spec: AttackSpec, received: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor], seed: int
) -> dict[str, torch.Tensor]:
    """What an attacker sends instead of `trained`; integer tensors (ids, counters) go out unchanged.

    `received` is where local training started; `seed` makes the noise reproducible per run, round and client.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    sent = {}
    for key in sorted(trained):
        weights = trained[key]
        if not weights.is_floating_point() or spec.kind == "label-flip":
            sent[key] = weights
        elif spec.kind == "noise":
            noise = torch.randn(weights.shape, generator=generator, dtype=torch.float32)
            sent[key] = weights + (spec.factor * noise).to(weights.dtype)
        else:
            sign = 1.0 if spec.kind == "scale" else -1.0
            sent[key] = received[key] + sign * spec.factor * (weights - received[key])
    return sent


def derangement(num_labels: int, seed: int) -> torch.Tensor:
    """A seeded permutation of 0..num_labels-1 that moves every label (identity for a single label)."""
    import torch

    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(num_labels)
        if num_labels < 2 or not (order == np.arange(num_labels)).any():
            return torch.as_tensor(order, dtype=torch.long)


def flipped_labels(labels: torch.Tensor, num_labels: int, seed: int) -> torch.Tensor:
    """`labels` mapped through one fixed derangement: every example teaches a wrong class, consistently."""
    return derangement(num_labels, seed)[labels]
