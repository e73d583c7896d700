"""What a merge rule receives: the global state, each client's update, and the round it happens in.

A client's update is its returned weights (the encoder plus its own domain's head), its averaging weight (the
number of examples it trained on) and, for rules that need them, extra statistics computed on its own data
(a diagonal Fisher, or Gram matrices of layer inputs). Rules are pure functions over these: no Flower import.
They may read the clients more than once (TIES elects signs before it averages), so callers pass a sequence;
values may be zero-copy views of received bytes, and rules never write into them.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from strategies.aggregation import as_tensors

State = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class ClientUpdate:
    """One client's contribution to a merge."""

    name: str  # for messages: "node 12 (bio-0)"
    identity: str  # stable across runs ("bio-0"): seeds the client's random draws and orders the sum
    state: Mapping[str, torch.Tensor]  # numpy arrays are viewed as tensors on construction, never copied
    weight: float  # examples trained on
    statistics: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", as_tensors(self.state))
        object.__setattr__(self, "statistics", as_tensors(self.statistics))


@dataclass(frozen=True)
class ServerText:
    """Unlabelled text the server holds, and a way to run a state on it: what a rule that learns its merge reads
    (AdaMerging). ``logits(state, domain, index)`` are the predictions of the model with weights ``state`` (a full
    state; differentiable in it) on batch ``index`` of ``domain``'s texts, through that domain's head."""

    logits: Callable[[Mapping[str, torch.Tensor], str, int], torch.Tensor]
    batches: Mapping[str, int]  # domain -> number of batches held


@dataclass
class MergeContext:
    """The round a merge belongs to, and what a rule reports back per client (kept in results.json)."""

    server_round: int = 1
    seed: int = 0
    num_heads: int | None = None  # attention heads per layer: permutation-aware rules need it
    server_text: ServerText | None = None  # None: the server holds no text (``server-data = false``)
    adapter_scale: float = 1.0  # LoRA's alpha / rank: a module's update is adapter_scale * B @ A (strategies.lora)
    notes: dict[str, dict[str, object]] = field(default_factory=dict)  # per client (by name)
    round_notes: dict[str, object] = field(default_factory=dict)  # about the whole merge

    def generator(self, identity: str, key: str = "") -> torch.Generator:
        """A generator seeded by the run's seed, the round, the client and (optionally) the parameter, so a
        client's draws do not depend on the order replies arrived in and can be drawn again identically."""
        return torch.Generator().manual_seed(self.seed_for(identity, key))

    def numpy_generator(self, identity: str, key: str = "") -> np.random.Generator:
        """The same seeding for numpy's PCG64, which draws random bytes about 5x faster than torch's generator."""
        return np.random.Generator(np.random.PCG64(self.seed_for(identity, key)))

    def seed_for(self, identity: str, key: str = "") -> int:
        """crc32 of the text: the same in every process (Python's str hash is salted per process)."""
        return zlib.crc32(f"{self.seed}/{self.server_round}/{identity}/{key}".encode())


Clients = Sequence[ClientUpdate]
