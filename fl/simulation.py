"""Run one merging strategy as a Flower simulation in this process and fail loudly if it does.

``flwr.simulation.run_simulation`` only logs a crashed ServerApp; the strategy's error is kept in a
``StrategyOutcome`` and raised here, so a failed client can never end as a quiet, unchanged model.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch
from flwr.simulation import run_simulation

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


def run_strategy(
    config: RunConfig,
    setting: RuleSetting,
    initial_state: Mapping[str, torch.Tensor],
    evaluator: CentralEvaluator,
) -> StrategyOutcome:
    outcome = StrategyOutcome()
    server = make_server_app(config, setting, initial_state, evaluator, outcome)
    backend = {
        "client_resources": {"num_cpus": cpus_per_client(config.num_clients), "num_gpus": 0.0},
        "init_args": {"log_to_driver": True, "include_dashboard": False},
    }
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
