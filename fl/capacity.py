"""Pre-flight memory check for a Flower simulation: refuse a client count that cannot fit, before any work.

In a simulation the ServerApp, the in-memory SuperLink and every reply live in the driver process. A round
holds each client's reply (the encoder plus one head, float32) until all have arrived, and from the second
round on the previous round's replies are still alive while the new ones arrive (Flower's ``Strategy.start``
keeps them in a local variable until the next ``send_and_receive`` returns): two replies per client. The Ray
actors (one per granted CPU share) each hold the libraries, a model with its gradients and AdamW state, and
what their allocator keeps of the models rebuilt for every message. Past what the machine has, the kernel
kills a process or Ray's memory monitor kills an actor mid-round. A rule whose clients send statistics makes
each reply larger by them (a Fisher: one float per weight; Grams: in x in floats per linear layer), computed
from the model's config like the weights. The constants were fitted, with margin, to
the peak memory (PSS) of the whole process tree measured by ``bench/scale.py`` (MiniLM-L6, 2 actors; the
estimate exceeds every measured peak by 0.5-1 GiB; see bench/README.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fl.config import ConfigError, RunConfig
from fl.model import resolve_model

GIB = 2**30
FIXED_BYTES = int(1.0 * GIB)  # driver with torch, transformers, flwr and ray imported, plus Ray's own daemons
PER_ACTOR_BYTES = int(0.9 * GIB)  # a Ray actor's libraries, data caches and allocator growth over rounds
ACTOR_MODEL_COPIES = 4.0  # per actor: received weights, model, gradients and AdamW's two moments
REPLY_MODEL_COPIES = 1.1  # per reply held by the driver (measured: 1.05-1.1 model copies)
HEADROOM = 0.85  # of the available memory; the rest is left to the page cache and to other processes' growth


class CapacityError(ConfigError):
    """The simulation would need more memory than this machine has available."""


@dataclass(frozen=True)
class MemoryEstimate:
    num_clients: int
    num_actors: int
    model_bytes: int
    peak_bytes: int
    available_bytes: int
    replies_held: int  # at the peak: one per client, two from the second round on
    max_clients: int  # the largest client count whose estimate fits

    def describe(self) -> str:
        return (
            f"{self.num_clients} clients need about {self.peak_bytes / GIB:.1f} GiB "
            f"({FIXED_BYTES / GIB:.1f} GiB base + {self.num_actors} actors + {self.replies_held} replies of "
            f"{self.model_bytes / 2**20:.0f} MiB)"
            f" and {HEADROOM:.0%} of the available memory is {HEADROOM * self.available_bytes / GIB:.1f} GiB"
        )


def model_bytes(model_path: str, statistic: str = "") -> int:
    """Float32 bytes of the encoder's weights plus the statistic a client sends with them ('fisher', 'gram' or
    none), from the config alone (no weight file read, no memory used)."""
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModel

    with torch.device("meta"):
        encoder = AutoModel.from_config(AutoConfig.from_pretrained(model_path))
    weights = sum(4 * p.numel() for p in encoder.parameters())
    if statistic == "fisher":
        return 2 * weights
    if statistic == "gram":
        return weights + sum(4 * m.in_features**2 for m in encoder.modules() if isinstance(m, nn.Linear))
    return weights


def available_memory() -> int:
    """MemAvailable, or what the cgroup still allows if that is less."""
    fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    available = int(fields["MemAvailable"].split()[0]) * 1024
    limit, used = Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current")
    if limit.is_file() and used.is_file() and limit.read_text().strip() != "max":
        available = min(available, int(limit.read_text()) - int(used.read_text()))
    return available


def replies_held(num_clients: int, rounds: int) -> int:
    return num_clients * (2 if rounds > 1 else 1)


def estimate_peak(replies: int, num_actors: int, model: int) -> int:
    actors = num_actors * (PER_ACTOR_BYTES + ACTOR_MODEL_COPIES * model)
    return int(FIXED_BYTES + actors + replies * REPLY_MODEL_COPIES * model)


def check_fits(
    config: RunConfig, model_path: str | None = None, available: int | None = None, statistics: tuple[str, ...] = ()
) -> MemoryEstimate:
    """Estimate the simulation's peak memory; raise CapacityError (one line) if it exceeds the headroom.

    Call it before loading data or weights (``model_path`` defaults to ``config.model``); ``available``
    defaults to what the machine has now; ``statistics`` are those the run's rules ask clients for (the
    largest reply counts).
    """
    path = model_path or resolve_model(config.model)
    model = max(model_bytes(path, statistic) for statistic in ("", *statistics))
    free = available_memory() if available is None else available
    cores = os.cpu_count() or 1
    actors = min(config.num_clients, cores)  # fl.simulation grants each client cores // min(clients, cores) CPUs
    budget = HEADROOM * free
    held = replies_held(config.num_clients, config.rounds)
    fixed = estimate_peak(0, cores, model)  # a large federation uses every core
    max_clients = max(0, int((budget - fixed) // (REPLY_MODEL_COPIES * model * replies_held(1, config.rounds))))
    found = MemoryEstimate(config.num_clients, actors, model, estimate_peak(held, actors, model), free, held, max_clients)
    if found.peak_bytes > budget:
        raise CapacityError(f"--clients-per-domain {config.clients_per_domain}: {found.describe()}; at most about {max_clients} clients fit")
    return found
