"""The Flower ServerApp: runs one merging strategy and scores the global model on every domain each round.

Central evaluation (``evaluate_fn``) scores the global model on each domain's held-out set before the
first round and after every round, so each strategy gets per-round, per-domain curves. A strategy
that raises (a failed client, a corrupt update) ends the run with that error instead of a silent
"0 results" round.

``app`` is the ServerApp of ``flwr run`` (simulation or deployment, pyproject.toml's
``[tool.flwr.app]``): it reads the run config and runs the whole experiment of ``sims/bio_legal.py``
on the grid, or, with ``server-data = false``, the federated-only run of ``fl.federated_run``.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fl.batches import Encoded
from fl.config import ConfigError, RunConfig, split_run_config
from fl.data import parse_partition_scheme
from fl.evaluation import Score, evaluate
from fl.model import MultiHeadEncoder, num_attention_heads
from strategies.flower import STRATEGIES, make_strategy

log = logging.getLogger(__name__)


class CentralEvaluator:
    """Scores the global weights on every domain's test set and keeps every round's scores."""

    def __init__(
        self,
        model: MultiHeadEncoder,
        tests: Mapping[str, Encoded],
        label: str,
        initial_scores: Mapping[str, Score] | None = None,
    ) -> None:
        self.model = model
        self.tests = tests
        self.label = label
        self.initial_scores = initial_scores  # the start model is already scored as the 'base' baseline
        self.history: dict[int, dict[str, Score]] = {}

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        if server_round == 0 and self.initial_scores is not None:
            scores = dict(self.initial_scores)
        else:
            self.model.load_state_dict(arrays.to_torch_state_dict())
            scores = {domain: evaluate(self.model, domain, data) for domain, data in self.tests.items()}
        self.history[server_round] = scores
        log.info(
            "%s round %d: %s",
            self.label,
            server_round,
            "  ".join(f"{d} acc {s.accuracy:.3f} f1 {s.macro_f1:.3f} loss {s.loss:.3f}" for d, s in scores.items()),
        )
        return MetricRecord({f"{d}-{k}": v for d, s in scores.items() for k, v in s.summary().items()})


@dataclass
class StrategyOutcome:
    """What one strategy's run leaves behind for the report."""

    final_state: dict[str, torch.Tensor] = field(default_factory=dict)
    client_history: list[dict[str, object]] = field(default_factory=list)
    client_evaluations: dict[int, dict[str, float]] = field(default_factory=dict)  # client-eval: round -> per-domain means
    error: BaseException | None = None


def run_on_grid(
    grid: Grid,
    config: RunConfig,
    strategy_name: str,
    initial_state: Mapping[str, torch.Tensor],
    evaluator: CentralEvaluator | None,
) -> StrategyOutcome:
    """Run one strategy for config.rounds rounds on the connected nodes; raises if any round fails."""
    strategy = make_strategy(
        strategy_name,
        config.num_clients,
        config.proximal_mu,
        config.client_eval,
        num_heads=num_attention_heads(config.model),
        align_residual=config.align_residual,
        reply_timeout=config.reply_timeout,
        continue_on_loss=config.on_node_loss == "continue",
        max_examples=config.local_steps * config.batch_size,
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(dict(initial_state)),
        num_rounds=config.rounds,
        timeout=config.reply_timeout,
        train_config=ConfigRecord({"local-steps": config.local_steps}),
        evaluate_fn=evaluator,
    )
    evaluations = {r: dict(m) for r, m in result.evaluate_metrics_clientapp.items()}
    return StrategyOutcome(result.arrays.to_torch_state_dict(), strategy.client_history, evaluations)


def make_server_app(
    config: RunConfig,
    strategy_name: str,
    initial_state: Mapping[str, torch.Tensor],
    evaluator: CentralEvaluator,
    outcome: StrategyOutcome,
) -> ServerApp:
    """A ServerApp bound to one strategy; results land in `outcome` (the simulation runs in this process)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            done = run_on_grid(grid, config, strategy_name, initial_state, evaluator)
        except BaseException as error:  # recorded for the caller: Flower itself only logs a ServerApp crash
            outcome.error = error
            raise
        outcome.final_state, outcome.client_history = done.final_state, done.client_history

    return app


@dataclass(frozen=True)
class AppOptions:
    """The run config of ``flwr run``: the experiment's options plus what the app itself needs."""

    config: RunConfig
    strategies: list[str]
    out: Path


def app_options(run_config: Mapping[str, object]) -> AppOptions:
    """Parse and check the run config before any model or data is loaded; ConfigError names the bad value."""
    config, options = split_run_config(run_config)
    strategies = [s.strip() for s in options.get("strategies", "fedavg,fedprox").split(",") if s.strip()]
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown or not strategies:
        raise ConfigError(f"strategies '{','.join(unknown)}' unknown: expected some of {', '.join(STRATEGIES)}")
    if "out" not in options:
        raise ConfigError("run config has no 'out': expected an absolute output folder")
    out = Path(options["out"]).expanduser()
    if not out.is_absolute():  # the app runs from a packaged copy, so a relative folder would land inside it
        raise ConfigError(f"out '{options['out']}' is relative: expected an absolute path (or one starting with ~)")
    parse_partition_scheme(config.partition)
    return AppOptions(config, strategies, out)


def package_versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ["flwr", "torch", "transformers", "datasets", "numpy", "ray"]:
        found[package] = version(package)
    return found


def show_fedmerge_logs() -> None:
    """Send fedmerge's INFO logs to stderr in the ServerApp process (Flower configures only its own logger)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    for name in ["fl", "strategies"]:
        logger = logging.getLogger(name)
        if not logger.handlers:
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """``flwr run``: every strategy on the connected SuperNodes, results written to the run config's ``out``."""
    show_fedmerge_logs()
    options = app_options(context.run_config)
    config = options.config
    log.info("fedmerge: strategies %s, %d rounds, results to %s", ",".join(options.strategies), config.rounds, options.out)
    if not config.server_data:
        from fl.federated_run import run_federated  # imports this module

        run_federated(grid, config, options.strategies, options.out, package_versions())
        return

    from fl.baselines import load_data
    from fl.experiment import run_experiment  # imports this module
    from fl.model import check_model

    model_path = check_model(config.model)
    data = load_data(config)

    def on_grid(cfg: RunConfig, name: str, start: dict[str, torch.Tensor], evaluator: CentralEvaluator) -> StrategyOutcome:
        return run_on_grid(grid, cfg, name, start, evaluator)

    run_experiment(config, model_path, data, options.strategies, options.out, package_versions(), runner=on_grid)
