"""The rounds of one strategy on a Flower Grid, and the central evaluation that scores each of them.

Central evaluation (``evaluate_fn``) scores the global model on each domain's held-out set before the first
round and after every round, so each strategy gets per-round, per-domain curves. A strategy that raises (a
failed client, a corrupt update) ends the run with that error instead of a silent "0 results" round. After
the evaluation of every round the strategy's checkpoint is written (``fl.run.checkpoint``), and a strategy found
checkpointed continues from its last round.
``run_on_grid`` serves a local simulation (``fl.federation.simulation``) and ``flwr run`` (``fl.apps.server_app``) alike.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fl.data.batches import Encoded
from fl.run.checkpoint import StrategyCheckpoint
from fl.run.config import RunConfig
from fl.modeling.evaluation import Score, evaluate
from fl.modeling.model import MultiHeadEncoder, num_attention_heads
from strategies.flower.strategy import make_strategy
from strategies.rules import RuleSetting

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
    setting: RuleSetting,
    initial_state: Mapping[str, torch.Tensor],
    evaluator: CentralEvaluator | None,
    checkpoint: StrategyCheckpoint | None = None,
    in_flight: int | None = None,
) -> StrategyOutcome:
    """Run one strategy for config.rounds rounds on the connected nodes; raises if any round fails.

    With a checkpoint, every completed round is saved, and a strategy that an earlier run left after round K
    continues with round K + 1 from the saved weights, scores and strategy state.
    """
    strategy = make_strategy(
        setting,
        config.num_clients,
        config.client_eval,
        num_heads=num_attention_heads(config.model),
        seed=config.seed,
        reply_timeout=config.reply_timeout,
        continue_on_loss=config.on_node_loss == "continue",
        max_examples=config.local_steps * config.batch_size,
        max_eval_examples=config.test_size,
        clients_per_round=config.sampled_clients,
        in_flight=in_flight,
    )
    done = checkpoint.load() if checkpoint is not None else None
    if done is not None:
        log.info("%s: resuming after round %d of %d", setting.name, done.server_round, config.rounds)
        strategy.restore(done.strategy, done.server_round)
        initial_state = done.weights
        if evaluator is not None:
            evaluator.history.update(done.scores)
    completed = done.server_round if done is not None else 0

    def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower calls this before round 1 and after every round, last: score, then checkpoint."""
        real_round = strategy.real_round(server_round)
        if server_round == 0 and completed > 0:
            return None  # the resumed start was scored when it was saved
        metrics = evaluator(real_round, arrays) if evaluator is not None else None
        if server_round > 0 and checkpoint is not None:
            scores = evaluator.history if evaluator is not None else {}
            checkpoint.save(real_round, arrays.to_torch_state_dict(), strategy.state(), scores)
        return metrics

    if completed < config.rounds:
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(dict(initial_state)),
            num_rounds=config.rounds - completed,
            timeout=config.reply_timeout,
            train_config=ConfigRecord({"local-steps": config.local_steps}),
            evaluate_fn=after_round,
        )
        final_state = result.arrays.to_torch_state_dict()
    else:
        final_state = dict(initial_state)
    return StrategyOutcome(final_state, strategy.client_history, dict(strategy.client_evaluations))


def make_server_app(
    config: RunConfig,
    setting: RuleSetting,
    initial_state: Mapping[str, torch.Tensor],
    evaluator: CentralEvaluator,
    outcome: StrategyOutcome,
    checkpoint: StrategyCheckpoint | None = None,
    in_flight: int | None = None,
) -> ServerApp:
    """A ServerApp bound to one strategy; results land in `outcome` (the simulation runs in this process)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            done = run_on_grid(grid, config, setting, initial_state, evaluator, checkpoint, in_flight)
        except BaseException as error:  # recorded for the caller: Flower itself only logs a ServerApp crash
            outcome.error = error
            raise
        outcome.final_state, outcome.client_history, outcome.client_evaluations = done.final_state, done.client_history, done.client_evaluations

    return app
