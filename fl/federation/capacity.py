"""Pre-flight memory check for a Flower simulation: refuse a federation that cannot fit, before any work.

In a simulation the ServerApp, the in-memory SuperLink and every reply live in the driver process. A rule that
merges replies as they arrive (FedAvg, FedProx: ``strategies.flower.streaming``) holds only the few in flight, whatever
the number of clients; any other rule holds one round's replies (the K clients trained per round) until the round
is complete, and drops them once merged. Besides those the driver keeps about three copies of the global model
(the start, the current one, the last message that carried it). The Ray actors (one per granted CPU share) each
hold the libraries, one model kept between messages with its gradients and AdamW state, and one tokenised copy
of each domain they serve. Past what the machine has, the kernel kills a process or Ray's memory monitor kills an
actor mid-round. A rule whose clients send statistics makes each reply larger by them (a Fisher: one float per
weight; Grams: in x in floats per linear layer), computed from the model's config like the weights. The constants
were fitted, with margin, to the peak memory (PSS) of the whole process tree measured by ``bench/scale.py``
(MiniLM-L6, 2 actors; see bench/README.md).

The actors on this machine follow the Ray options. Flower starts as many as the CPUs allow, each reserving
``--client-cpus`` (by default this machine's cores split among the clients), and at most one per client ever
holds a model. With ``--ray-address`` (or RAY_ADDRESS) this machine is the driver's node of a cluster: Ray places
actors on it as on any node, up to the CPUs it offers (at most its cores; docs/scale-out.md's head offers 8), and
a node too small for one client hosts none, so its memory holds the server side only; the other nodes' memory is
theirs (docs/scale-out.md, "Memory per node"). The replies in flight are counted from this machine's actors: on a
cluster they follow all of its actors, which this check does not see.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fl.modeling.model import meta_encoder, resolve_model
from fl.run.config import ConfigError, RunConfig

GIB = 2**30
FIXED_BYTES = int(1.0 * GIB)  # driver with torch, transformers, flwr and ray imported, plus Ray's own daemons
PER_ACTOR_BYTES = int(0.9 * GIB)  # a Ray actor's libraries, data caches and allocator growth over rounds
ACTOR_MODEL_COPIES = 4.0  # per actor: received weights, model, gradients and AdamW's two moments
REPLY_MODEL_COPIES = 1.1  # per reply held by the driver (measured: 1.05-1.1 model copies)
GLOBAL_MODEL_COPIES = 3  # the driver's start, current and last-sent global model
IN_FLIGHT_EXTRA = 2  # replies a streamed merge may hold beyond one per actor (pulled together, or out of order)
RETAINED_COPIES = 16  # freed reply buffers the driver's allocator keeps (measured: 14-19 model copies at 100-1000 clients)
HEADROOM = 0.85  # of the available memory; the rest is left to the page cache and to other processes' growth


class CapacityError(ConfigError):
    """The simulation would need more memory (or CPUs) than this machine has available."""


@dataclass(frozen=True)
class MemoryEstimate:
    num_clients: int
    num_actors: int
    model_bytes: int
    peak_bytes: int
    available_bytes: int
    replies_held: int  # at the peak: the replies in flight (streamed merge) or one round's (any other rule)
    streamed: bool  # every rule of the run merges replies as they arrive
    max_clients: int  # the largest client count whose estimate fits
    cluster: bool = False  # the clients run on a Ray cluster: this machine is its driver's node
    reply_bytes: int = 0  # one reply's weights and statistic when smaller than the model (LoRA adapters); 0: the model's

    def describe(self) -> str:
        here = "this node of the cluster" if self.cluster else "this machine"
        return (
            f"{self.num_clients} clients need about {self.peak_bytes / GIB:.1f} GiB on {here} "
            f"({FIXED_BYTES / GIB:.1f} GiB base + {self.num_actors} actors + {self.replies_held} replies or global copies of "
            f"{self.model_bytes / 2**20:.0f} MiB"
            + (f", replies of {self.reply_bytes / 2**20:.1f} MiB)" if self.reply_bytes else ")")
            + f" and {HEADROOM:.0%} of the available memory is {HEADROOM * self.available_bytes / GIB:.1f} GiB"
        )


def model_bytes(model_path: str, statistic: str = "") -> int:
    """Float32 bytes of the encoder's weights plus the statistic a client sends with them ('fisher', 'gram' or
    none), from the config alone (no weight file read, no memory used)."""
    from torch import nn

    encoder = meta_encoder(model_path)
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


def actors_here(num_clients: int, client_cpus: int, cores: int) -> int:
    """Client actors on a machine of ``cores`` CPUs that ever hold a model: as many as the CPUs allow, each
    reserving ``client_cpus`` (0: the cores split among the clients, as fl.federation.simulation grants them), at
    most one per client; 0 when one client needs more CPUs than there are."""
    each = client_cpus or max(1, cores // min(num_clients, cores))
    return min(num_clients, cores // each)


def replies_held(per_round: int, num_actors: int, streamed: bool) -> int:
    """Model-sized objects the driver holds at once: the global copies plus the replies in flight (a streamed
    merge) or the round's replies (any other rule)."""
    replies = min(per_round, num_actors + IN_FLIGHT_EXTRA + RETAINED_COPIES) if streamed else per_round
    return GLOBAL_MODEL_COPIES + replies


def estimate_peak(replies: int, num_actors: int, model: int, reply: int = 0) -> int:
    """``replies`` counts the global copies too (``replies_held``): those are model-sized, the rest ``reply``-sized
    (0: model-sized as well)."""
    actors = num_actors * (PER_ACTOR_BYTES + ACTOR_MODEL_COPIES * model)
    reply = reply or model
    return int(FIXED_BYTES + actors + REPLY_MODEL_COPIES * (GLOBAL_MODEL_COPIES * model + (replies - GLOBAL_MODEL_COPIES) * reply))


def adapter_bytes(model_path: str, config: RunConfig) -> int:
    """Float32 bytes of the LoRA adapters a client sends with --peft lora (rank x (in + out) per target layer),
    from the config alone; 0 without adapters (a reply is then the model's size)."""
    lora = config.lora_settings()
    if lora is None:
        return 0
    from torch import nn

    from fl.modeling.lora import target_modules

    encoder = meta_encoder(model_path)
    targets = set(target_modules(encoder, lora))
    linear = [m for name, m in encoder.named_modules() if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets]
    return sum(4 * lora.rank * (m.in_features + m.out_features) for m in linear)


def check_fits(
    config: RunConfig,
    model_path: str | None = None,
    available: int | None = None,
    statistics: tuple[str, ...] = (),
    streamed: bool = False,
    client_cpus: int = 0,
    cluster: bool = False,
    cores: int | None = None,
) -> MemoryEstimate:
    """Estimate the simulation's peak memory on this machine; raise CapacityError (one line) if it exceeds the headroom.

    Call it before loading data or weights (``model_path`` defaults to ``config.model``); ``available``
    defaults to what the machine has now; ``statistics`` are those the run's rules ask clients for (the
    largest reply counts); ``streamed``: every rule of the run merges replies as they arrive; ``client_cpus``
    and ``cluster``: the Ray options (--client-cpus; --ray-address or RAY_ADDRESS); ``cores`` defaults to this
    machine's. On a local Ray, a client that needs more CPUs than there are is refused too.
    """
    cores = cores or os.cpu_count() or 1
    actors = actors_here(config.num_clients, client_cpus, cores)
    if not actors and not cluster:
        raise CapacityError(f"--client-cpus {client_cpus}: a client needs more CPUs than this machine's {cores}; expected at most {cores} (or a Ray cluster: --ray-address)")
    path = model_path or resolve_model(config.model)
    model = max(model_bytes(path, statistic) for statistic in ("", *statistics))
    reply = adapter_bytes(path, config)
    free = available_memory() if available is None else available
    budget = HEADROOM * free
    per_round = config.sampled_clients
    held = replies_held(per_round, actors, streamed)
    fixed = estimate_peak(GLOBAL_MODEL_COPIES, cores // (client_cpus or 1), model)  # a large federation fills every CPU here
    max_clients = max(0, int((budget - fixed) // (REPLY_MODEL_COPIES * (reply or model))))
    found = MemoryEstimate(
        num_clients=config.num_clients, num_actors=actors, model_bytes=model, peak_bytes=estimate_peak(held, actors, model, reply),
        available_bytes=free, replies_held=held, streamed=streamed, max_clients=max_clients, cluster=cluster, reply_bytes=reply,
    )
    if found.peak_bytes > budget:
        option = f"--clients-per-round {config.clients_per_round}" if per_round < config.num_clients else f"--clients-per-domain {config.clients_per_domain}"
        raise CapacityError(
            f"{option}: {found.describe()}; at most about {max_clients} clients per round fit"
            " (fedavg and fedprox merge replies as they arrive and need no more for more clients)"
        )
    return found
