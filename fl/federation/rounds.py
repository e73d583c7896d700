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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fl.data.batches import Encoded
from fl.federation.stragglers import ActorWatch
from fl.modeling.evaluation import Score, evaluate
from fl.modeling.model import MultiHeadEncoder, num_attention_heads
from fl.run.checkpoint import StrategyCheckpoint
from fl.run.config import RunConfig
from strategies.flower.strategy import RoundSettings, RuleStrategy
from strategies.rules import RuleSetting
from strategies.update import ServerText

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
class StrategyJob:
    """One strategy's run, as every runner (a local simulation, a given Grid) takes it."""

    config: RunConfig
    setting: RuleSetting
    start: Mapping[str, torch.Tensor]  # the global model before round 1
    evaluator: CentralEvaluator | None  # None: the server holds no test data (``server-data = false``)
    checkpoint: StrategyCheckpoint | None = None  # where each completed round is saved; None: not saved
    server_text: ServerText | None = None  # unlabelled text for a rule that learns from it (AdaMerging)


@dataclass
class StrategyOutcome:
    """What one strategy's run leaves behind for the report."""

    final_state: dict[str, torch.Tensor] = field(default_factory=dict)
    client_history: list[dict[str, object]] = field(default_factory=list)
    client_evaluations: dict[int, dict[str, float]] = field(default_factory=dict)  # client-eval: round -> per-domain means
    error: BaseException | None = None


def round_settings(
    config: RunConfig, in_flight: int | None, abandon: Callable[[list[str]], object] | None = None, server_text: ServerText | None = None
) -> RoundSettings:
    """The strategy's view of the run: its federation, seed, reply policy and the limits of honest replies."""
    return RoundSettings(
        num_clients=config.num_clients,
        client_eval=config.client_eval,
        num_heads=num_attention_heads(config.model),
        seed=config.seed,
        reply_timeout=config.reply_timeout,
        continue_on_loss=config.on_node_loss == "continue",
        max_examples=config.local_steps * config.batch_size,
        max_eval_examples=config.test_size,
        clients_per_round=config.sampled_clients,
        in_flight=in_flight,
        abandon=abandon,
        server_text=server_text,
        adapter_scale=config.adapter_scale,
        embeddings_sent=config.sends_word_embeddings,
    )


def run_on_grid(grid: Grid, job: StrategyJob, in_flight: int | None = None, watch: ActorWatch | None = None) -> StrategyOutcome:
    """Run one strategy for config.rounds rounds on the connected nodes; raises if any round fails.

    With a checkpoint, every completed round is saved, and a strategy that an earlier run left after round K
    continues with round K + 1 from the saved weights, scores and strategy state. With a `watch` (a simulation), the
    clients of messages a round gave up on are abandoned.
    """
    config, setting, evaluator, checkpoint = job.config, job.setting, job.evaluator, job.checkpoint
    initial_state = job.start
    strategy = RuleStrategy(setting, round_settings(config, in_flight, watch.abandon if watch is not None else None, job.server_text))
    done = checkpoint.load() if checkpoint is not None else None
    if done is not None:
        log.info("%s: resuming after round %d of %d", setting.name, done.server_round, config.rounds)
        strategy.restore(done.strategy_state, done.server_round)
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


StrategyRunner = Callable[[StrategyJob], StrategyOutcome]  # a local simulation, or a given Grid


def read_back(job: StrategyJob) -> StrategyOutcome | None:
    """The outcome of a strategy that an earlier run of this folder finished (its rounds' scores go to the job's
    evaluator; its weights are in its model folder), or None when it still has rounds to run."""
    done = job.checkpoint.load() if job.checkpoint is not None else None
    if done is None or not done.finished:
        return None
    log.info("strategy %s: finished earlier, read back from %s", job.setting.name, job.checkpoint.folder)  # type: ignore[union-attr]
    if job.evaluator is not None:
        job.evaluator.history.update(done.scores)
    state = done.strategy_state
    evaluations = {int(r): dict(m) for r, m in state["client-evaluations"].items()}  # type: ignore[union-attr]
    return StrategyOutcome(client_history=list(state["client-history"]), client_evaluations=evaluations)  # type: ignore[call-overload]


def run_and_save(job: StrategyJob, runner: StrategyRunner, save: Callable[[Mapping[str, torch.Tensor]], None]) -> StrategyOutcome:
    """Run the strategy (from its last checkpoint, if any), save its final model, then mark it finished: a strategy
    is finished only once its model folder exists."""
    outcome = runner(job)
    save(outcome.final_state)
    if job.checkpoint is not None:
        job.checkpoint.finish()
    return outcome


def make_server_app(job: StrategyJob, outcome: StrategyOutcome, in_flight: int | None = None, watch: ActorWatch | None = None) -> ServerApp:
    """A ServerApp bound to one strategy; results land in `outcome` (the simulation runs in this process). Whatever
    client task still runs when the server is done is abandoned, so the run's end never waits for it."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            done = run_on_grid(grid, job, in_flight, watch)
        except BaseException as error:  # recorded for the caller: Flower itself only logs a ServerApp crash
            outcome.error = error
            raise
        finally:
            if watch is not None:
                watch.abandon_all()
        outcome.final_state, outcome.client_history, outcome.client_evaluations = done.final_state, done.client_history, done.client_evaluations

    return app

