"""Run one merging strategy as a Flower simulation in this process and fail loudly if it does.

``flwr.simulation.run_simulation`` only logs a crashed ServerApp; the strategy's error is kept in a
``StrategyOutcome`` and raised here, so a failed client can never end as a quiet, unchanged model.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping

import torch
from flwr.simulation import run_simulation

from fl.checkpoint import StrategyCheckpoint
from fl.client_app import make_client_app
from fl.config import RunConfig
from fl.rounds import CentralEvaluator, StrategyOutcome, make_server_app
from strategies.rules import RuleSetting

log = logging.getLogger(__name__)


class SimulationFailed(RuntimeError):
    """A strategy's simulation ended without a trustworthy merged model."""


def cpus_per_client(num_clients: int) -> int:
    """Split the machine's cores among clients that train at once, at least one each."""
    cores = os.cpu_count() or 1
    return max(1, cores // min(num_clients, cores))


def start_ray(init_args: Mapping[str, object]) -> None:
    """Start Ray as Flower's RayBackend would (it skips its own ``ray.init`` when Ray runs), keeping this process's
    SIGTERM handler: ``ray.init`` replaces it with a ``sys.exit`` that aborts mid-round with a traceback (exit -6)
    instead of the clean stop of ``fl.interrupt``. Flower shuts Ray down when the simulation ends."""
    import ray

    if ray.is_initialized():
        return
    pythonpath = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    os.environ["PYTHONPATH"] = pythonpath  # Ray's workers inherit the environment, not this driver's sys.path
    handler = signal.getsignal(signal.SIGTERM)
    ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **init_args)
    if threading.current_thread() is threading.main_thread() and handler is not None:
        signal.signal(signal.SIGTERM, handler)


def run_strategy(
    config: RunConfig,
    setting: RuleSetting,
    initial_state: Mapping[str, torch.Tensor],
    evaluator: CentralEvaluator,
    checkpoint: StrategyCheckpoint | None = None,
) -> StrategyOutcome:
    outcome = StrategyOutcome()
    server = make_server_app(config, setting, initial_state, evaluator, outcome, checkpoint)
    init_args = {"log_to_driver": True, "include_dashboard": False}
    backend = {"client_resources": {"num_cpus": cpus_per_client(config.num_clients), "num_gpus": 0.0}, "init_args": init_args}
    start_ray(init_args)
    try:
        run_simulation(
            server_app=server,
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
