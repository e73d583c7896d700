"""Run one merging strategy as a Flower simulation in this process and fail loudly if it does.

``flwr.simulation.run_simulation`` only logs a crashed ServerApp; the strategy's error is kept in a
``StrategyOutcome`` and raised here, so a failed client can never end as a quiet, unchanged model.

The clients run as Ray actors on a fresh local Ray, or on a running Ray cluster (``SimulationResources``;
docs/scale-out.md): the cluster is checked before the simulation starts, because Flower waits until its
timeout for clients that no node can host (a GPU share on a cluster without GPUs).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from flwr.simulation import run_simulation

from fl.federation.client import make_client_app
from fl.federation.rounds import StrategyJob, StrategyOutcome, make_server_app
from fl.federation.stragglers import RESTARTABLE, watched_actors
from fl.run.cli import RunFailed
from fl.run.config import ConfigError

log = logging.getLogger(__name__)


class SimulationFailed(RunFailed):
    """A strategy's simulation ended without a trustworthy merged model."""


def cpus_per_client(num_clients: int) -> int:
    """Split the machine's cores among clients that train at once, at least one each."""
    cores = os.cpu_count() or 1
    return max(1, cores // min(num_clients, cores))


@dataclass(frozen=True)
class SimulationResources:
    """Where the client actors run and what each one reserves there (the CLI's --ray-address, --client-*)."""

    ray_address: str = ""  # HOST:PORT of a running cluster (`ray start --head`); '' = RAY_ADDRESS if set, else a fresh local Ray
    cpus_per_client: int = 0  # CPUs (and torch threads) per client actor; 0 = this machine's cores split among the clients
    gpus_per_client: float = 0.0  # GPU share per client actor: 0.25 = four clients per GPU; 0 = none

    def validate(self) -> SimulationResources:
        """Refuse a value Ray cannot use, with one line naming it."""
        if self.ray_address:
            check_address(self.ray_address, "--ray-address")
        cpus = self.cpus_per_client
        if isinstance(cpus, bool) or not isinstance(cpus, int) or cpus < 0:
            raise ConfigError(f"--client-cpus {cpus}: expected an integer >= 0 (0 = split this machine's cores)")
        gpus = self.gpus_per_client
        if isinstance(gpus, bool) or not isinstance(gpus, (int, float)) or not math.isfinite(gpus) or gpus < 0:
            raise ConfigError(f"--client-gpus {gpus}: expected a finite number >= 0")
        if (gpus > 1 and gpus != int(gpus)) or abs(gpus * 10_000 - round(gpus * 10_000)) > 1e-6:
            raise ConfigError(f"--client-gpus {gpus}: expected a share of one GPU in (0, 1] (at most 4 decimals) or a whole number of GPUs")
        return self

    def cluster_address(self) -> str | None:
        """The cluster to attach to, by Ray's rules: this option, else RAY_ADDRESS; None = a local Ray.

        Fails in seconds when nothing answers there: ``ray.init`` would retry for many minutes.
        """
        source = "--ray-address" if self.ray_address else "RAY_ADDRESS"
        address = self.ray_address or os.environ.get("RAY_ADDRESS") or None
        if address is None:
            return None
        check_address(address, source)
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=5.0).close()
        except OSError as error:
            raise ConfigError(f"{source} {address}: no Ray cluster answers there ({error})") from None
        return address

    def client_resources(self, num_clients: int) -> dict[str, float]:
        """What each client actor reserves, in the names of Flower's backend config."""
        return {"num_cpus": self.cpus_per_client or cpus_per_client(num_clients), "num_gpus": float(self.gpus_per_client)}


def check_address(address: str, source: str) -> None:
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{source} {address}: expected HOST:PORT of a running Ray cluster's head (`ray start --head --port=PORT`)")


def start_ray(init_args: Mapping[str, object], address: str | None = None) -> None:
    """Start Ray, or attach to the cluster at `address`, as Flower's RayBackend would (it skips its own ``ray.init``
    when Ray runs), keeping this process's SIGTERM handler: ``ray.init`` replaces it with a ``sys.exit`` that aborts
    mid-round with a traceback (exit -6) instead of the clean stop of ``fl.run.interrupt``. Flower calls ``ray.shutdown``
    when the simulation ends: that stops a local Ray, and only disconnects from a cluster."""
    import ray

    if ray.is_initialized():
        return
    pythonpath = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    os.environ["PYTHONPATH"] = pythonpath  # Ray's workers inherit the environment, not this driver's sys.path
    handler = signal.getsignal(signal.SIGTERM)
    try:
        ray.init(address=address, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **init_args)
    except (ConnectionError, RuntimeError) as error:
        if not address:
            raise
        raise ConfigError(f"Ray cluster at {address}: cannot attach ({error}); run this on one of its nodes") from None
    if threading.current_thread() is threading.main_thread() and handler is not None:
        signal.signal(signal.SIGTERM, handler)


def init_args(address: str | None) -> dict[str, object]:
    """``ray.init`` arguments; a cluster refuses those that shape a new one (num_cpus, object_store_memory...) and
    ignores include_dashboard (``ray start`` decided it)."""
    return {"log_to_driver": True} if address else {"log_to_driver": True, "include_dashboard": False}


def check_cluster(client: Mapping[str, float], address: str | None) -> None:
    """Refuse clients that no node of the running Ray can host, before Flower waits for them until its timeout."""
    import ray

    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"] and node["Resources"]]
    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    where = f"the Ray cluster at {address}" if address else "this machine"
    if address:
        log.info("attached to the Ray cluster at %s: %g CPUs, %g GPUs, %d nodes", address, cpus, gpus, len(nodes))
    if client["num_gpus"] > 0 and not gpus:
        raise ConfigError(f"--client-gpus {client['num_gpus']:g}: {where} has no GPU ({cpus:g} CPUs on {len(nodes)} nodes)")
    if not any(fits(node, client) for node in nodes):
        largest = max(nodes, key=lambda node: (node.get("CPU", 0.0), node.get("GPU", 0.0)), default={})
        raise ConfigError(
            f"--client-cpus {client['num_cpus']:g} --client-gpus {client['num_gpus']:g}: no node of {where} can host one client "
            f"(largest node: {largest.get('CPU', 0.0):g} CPUs, {largest.get('GPU', 0.0):g} GPUs)"
        )


def fits(node: Mapping[str, float], client: Mapping[str, float]) -> bool:
    return node.get("CPU", 0.0) >= client["num_cpus"] and node.get("GPU", 0.0) >= client["num_gpus"]


def check_resources(resources: SimulationResources, num_clients: int) -> None:
    """Check before any work that the clients can run: attach to the cluster and read its resources, or, with a
    local Ray, check that this machine has the GPU asked for (torch sees it; starting Ray here costs seconds)."""
    address = resources.validate().cluster_address()
    client = resources.client_resources(num_clients)
    if address:
        import ray

        start_ray({**init_args(address), "log_to_driver": False}, address)
        try:
            check_cluster(client, address)
        finally:
            ray.shutdown()  # disconnects; the cluster stays up
    elif client["num_gpus"] > 0 and not torch.cuda.device_count():
        raise ConfigError(f"--client-gpus {client['num_gpus']:g}: this machine has no GPU that torch can use")


def messages_in_flight(client: Mapping[str, float]) -> int:
    """How many client messages to keep in flight: two per actor the running Ray can host, so no actor waits and
    Flower's engine does not queue (and hold in memory) the messages of every client at once."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 1.0)
    return 2 * max(1, int(cpus // max(client["num_cpus"], 1e-9)))


def run_strategy(job: StrategyJob, resources: SimulationResources = SimulationResources()) -> StrategyOutcome:
    """One strategy as a Flower simulation on a local Ray, or on the cluster `resources` name."""
    import ray

    config, setting = job.config, job.setting

    address = resources.validate().cluster_address()
    client = resources.client_resources(config.num_clients)
    outcome = StrategyOutcome()
    backend = {"client_resources": {**client, **RESTARTABLE}, "init_args": init_args(address)}
    start_ray(backend["init_args"], address)
    try:
        check_cluster(client, address)
    except ConfigError:
        ray.shutdown()
        raise
    try:
        with watched_actors() as watch:
            run_simulation(
                server_app=make_server_app(job, outcome, messages_in_flight(client), watch),
                client_app=make_client_app(config),
                num_supernodes=config.num_clients,
                backend_config=backend,
            )
    except Exception as error:  # run_simulation re-raises the ServerApp's error
        outcome.error = outcome.error or error
    if outcome.error is not None:
        raise SimulationFailed(f"strategy '{setting.name}' failed: {outcome.error}") from outcome.error
    if not outcome.final_state:
        raise SimulationFailed(f"strategy '{setting.name}' ended without a merged model (see the log above)")
    return outcome
