"""One Flower strategy that merges with any registered rule: Flower's FedAvg round loop, fedmerge's merge.

Flower's ``Strategy.start`` runs the rounds; this class only fills its hooks. ``configure_train`` remembers the
global model and tells the clients what the rule needs from them (FedProx's mu, which statistic to send);
``aggregate_train`` keeps the usable replies (``strategies.flower.replies``), reads each as a zero-copy view of its
bytes, and merges with the rule (``strategies.rules``), which checks every client first. Every returned key is
merged over the clients that sent it, so a domain head is never diluted by clients that did not train it; keys
nobody sent keep their global value. Replies are merged in the order of their clients' names, not of arrival,
so the same seed gives the same sums. The merged model is checked finite before it becomes the global one.
Client evaluations are checked and averaged per domain.

Cross-device scale: with ``clients_per_round`` K, each round trains K clients drawn with the seed and the round
(``strategies.flower.sampling``), every domain represented when K allows. In every run a roll call (a query without data)
first learns which client each node serves, so that a node that falls silent later is named by its client. A rule that is a weighted mean (FedAvg, FedProx) merges each reply as it arrives
(``strategies.flower.streaming``), so the server holds only the replies in flight; every rule empties the replies' arrays
once merged, which Flower's loop would otherwise keep alive for another round.

A resumed run starts Flower's loop again at its round 1: ``first_round`` shifts every round number the hooks
see (and send to clients, whose seeds derive from it) to the real one, so round k + 1 of a resumed run is the
round k + 1 of an uninterrupted one. ``state()`` / ``restore()`` carry what the strategy learned across that.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from strategies.aggregation import UpdateError, all_finite
from strategies.flower.records import record_views
from strategies.flower.replies import ReplyPolicy, check_complete, check_evaluation, check_metrics, check_own_head, client_identity, describe_client
from strategies.flower.sampling import sample_clients
from strategies.flower.streaming import InOrderMean, ReplyStream, client_bytes, drop_arrays
from strategies.lora import home_digest, sent_down
from strategies.rules import RuleSetting, check_client
from strategies.update import ClientUpdate, MergeContext, ServerText

log = logging.getLogger(__name__)

FLOAT32_MAX = float(torch.finfo(torch.float32).max)
ROLL_CALL_S = 600.0  # the least a roll call waits: it starts every client


def per_domain_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Weighted mean of the clients' metrics within each domain (``client`` record), keys prefixed by the domain.

    One mean over all clients would mix domains of different sizes and difficulty into one number.
    """
    by_domain: dict[str, list[RecordDict]] = {}
    for record in records:
        by_domain.setdefault(str(record["client"]["domain"]), []).append(record)
    merged = MetricRecord()
    for domain, group in sorted(by_domain.items()):
        for key, value in aggregate_metricrecords(group, weighted_by_key).items():
            merged[f"{domain}-{key}"] = value
        merged[f"{domain}-{weighted_by_key}"] = sum(int(r["metrics"][weighted_by_key]) for r in group)
        merged[f"{domain}-clients"] = len(group)
    return merged


@dataclass(frozen=True)
class RoundSettings:
    """What the strategy knows of the federation besides its rule; the defaults suit a test on a few clients."""

    num_clients: int
    client_eval: bool = False  # every client also scores the global model after each round
    num_heads: int | None = None  # attention heads of the encoder, for rules that match units (aligned)
    seed: int = 0  # the run's seed: sampling and seeded rules (DARE) derive from it
    reply_timeout: float = 3600.0  # seconds a round waits for its replies
    continue_on_loss: bool = False  # a lost node ends the run (False) or the run goes on without it
    max_examples: int | None = None  # the most examples a client can train on in a round: a larger claim is refused
    max_eval_examples: int | None = None  # a client's test split holds at most this many examples
    clients_per_round: int | None = None  # None: every client trains every round
    in_flight: int | None = None  # messages sent ahead of their replies (simulation: a few per actor); None: all
    abandon: Callable[[list[str]], object] | None = None  # stops the clients of messages a round gave up on (by message id)
    server_text: ServerText | None = None  # unlabelled text the server holds, for a rule that learns from it
    adapter_scale: float = 1.0  # LoRA's alpha / rank, when the global state holds adapters (strategies.lora)
    embeddings_sent: bool = True  # whether clients send the word embeddings (not when frozen: they stay home)


class RuleStrategy(FedAvg):
    """Trains every client (or K drawn with the seed) each round and merges their replies with ``setting``'s rule."""

    def __init__(self, setting: RuleSetting, settings: RoundSettings) -> None:
        num_clients = settings.num_clients
        super().__init__(
            fraction_train=1.0,
            min_train_nodes=num_clients,
            min_available_nodes=num_clients,
            fraction_evaluate=1.0 if settings.client_eval else 0.0,
            min_evaluate_nodes=num_clients if settings.client_eval else 0,
            evaluate_metrics_aggr_fn=per_domain_metrics,
        )
        self.setting = setting
        self.policy = ReplyPolicy(num_clients, settings.reply_timeout, settings.continue_on_loss, settings.max_examples, abandon=settings.abandon)
        self.num_heads = settings.num_heads
        self.server_text = settings.server_text
        self.adapter_scale = settings.adapter_scale
        self.embeddings_sent = settings.embeddings_sent
        self.seed = settings.seed
        self.max_eval_examples = settings.max_eval_examples
        self.first_round = 1  # the real number of Flower's round 1 (k + 1 when resuming after round k)
        self.clients_per_round = settings.clients_per_round
        self.in_flight = settings.in_flight
        self.streams = setting.rule.streams and setting.rule.statistic is None  # merge each reply as it arrives
        self.stream: InOrderMean | None = None  # this round's streamed merge
        self.sampled: list[str] = []  # the clients this round sent training to, when sampling
        self.global_state: dict[str, torch.Tensor] = {}
        self.client_history: list[dict[str, object]] = []
        self.client_evaluations: dict[int, dict[str, float]] = {}  # round -> per-domain means of client evaluations

    def real_round(self, server_round: int) -> int:
        return server_round + self.first_round - 1

    def state(self) -> dict[str, object]:
        """What the strategy learned so far, as JSON: enough to continue after a restart."""
        policy = self.policy
        return {
            "client-history": self.client_history,
            "client-evaluations": {str(r): m for r, m in self.client_evaluations.items()},
            "num-nodes": policy.num_nodes,
            "lost-nodes": {str(r): lost for r, lost in policy.lost_nodes.items()},
        }

    def restore(self, state: dict[str, object], completed_round: int) -> None:
        """Continue after `completed_round` with the state a checkpoint saved (``state()``)."""
        self.first_round = completed_round + 1
        self.client_history = list(state["client-history"])  # type: ignore[call-overload]
        self.client_evaluations = {int(r): dict(m) for r, m in state["client-evaluations"].items()}  # type: ignore[union-attr]
        self.policy.num_nodes = int(state["num-nodes"])  # type: ignore[call-overload]
        self.policy.lost_nodes = {int(r): list(v) for r, v in state["lost-nodes"].items()}  # type: ignore[union-attr]
        for entry in self.client_history:  # the history's "lost" lists are the policy's lists, as in aggregate_train
            entry["lost"] = self.policy.lost_nodes.setdefault(int(entry["round"]), entry["lost"])  # type: ignore[arg-type]

    def start(self, grid: Grid, *args: object, **kwargs: object) -> Result:
        """Flower's round loop, on a grid that hands each training reply to the streamed merge as it arrives."""
        return super().start(ReplyStream(grid, self.on_reply, self.in_flight), *args, **kwargs)  # type: ignore[arg-type]

    def sampling(self) -> bool:
        """Whether this round trains only some of the nodes still expected."""
        return self.clients_per_round is not None and self.clients_per_round < self.policy.num_nodes

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        server_round = self.real_round(server_round)
        self.global_state = arrays.to_torch_state_dict()
        arrays = self.sent_down(arrays, config)
        self.follow_policy()
        nodes = self.policy.wait(grid, f"round {server_round}")
        for key, value in self.setting.client_config().items():
            config[key] = value
        self.stream, self.sampled = None, []
        self.roll_call(grid, nodes, server_round)  # sampling by domain, merging in name order, naming a lost node
        if not (self.sampling() or self.streams):
            return self.policy.sending(super().configure_train(server_round, arrays, config, self.policy.reachable(grid)))
        names = {node: self.policy.node_roles[node] for node in nodes if node in self.policy.node_roles}
        chosen = sample_clients(names, self.clients_per_round or len(names), self.seed, server_round)
        if self.sampling():
            self.sampled = [names[node] for node in chosen]
            log.info("round %d: training %d of %d clients: %s", server_round, len(chosen), len(names), ", ".join(self.sampled))
        chosen.sort(key=lambda node: names[node])  # sent in the order they are merged in: few replies wait for others
        if self.streams:
            self.stream = InOrderMean([names[node] for node in chosen], self.admit)
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self.policy.sending([Message(record, dst_node_id=node, message_type=MessageType.TRAIN) for node in chosen])

    def sent_down(self, arrays: ArrayRecord, config: ConfigRecord) -> ArrayRecord:
        """What the clients receive of the global model: not the weights that never change (the LoRA base, frozen
        word embeddings), which each client loads itself and checks against the hash in ``base-digest``, computed
        from this global model every time so that a merge which moved them is refused rather than ignored."""
        keys = sent_down(arrays.keys(), embeddings=self.embeddings_sent)
        if len(keys) == len(arrays):
            return arrays
        sent = set(keys)
        config["base-digest"] = home_digest(record_views(arrays), sent)
        return ArrayRecord({key: arrays[key] for key in keys})

    def roll_call(self, grid: Grid, nodes: list[int], server_round: int) -> None:
        """Ask the nodes whose client is not yet known which one they serve (a query without data). It is a node's
        first message, which starts its client (in simulation a Ray actor importing torch: minutes on a loaded
        machine), so it waits at least ROLL_CALL_S whatever the reply timeout."""
        unknown = [node for node in nodes if node not in self.policy.node_roles]
        if not unknown:
            return
        record = RecordDict({"config": ConfigRecord({"roll-call": True})})
        queries = [Message(record, dst_node_id=node, message_type=MessageType.QUERY) for node in unknown]
        self.policy.sending(queries)
        unwindowed = getattr(grid, "grid", grid)  # queries carry no weights: all at once, past the ReplyStream's window
        timeout = max(self.policy.reply_timeout, ROLL_CALL_S)
        self.policy.usable(server_round, "roll call", list(unwindowed.send_and_receive(queries, timeout=timeout)), waited=timeout)

    def on_reply(self, msg: Message) -> Message:
        """Each reply as it is pulled: a training reply of a streamed round is checked and merged now."""
        if self.stream is None or msg.metadata.message_type != MessageType.TRAIN or msg.has_error():
            return msg
        self.policy.check_role(msg)  # a changed claim is refused naming the node, before the stream asks who this is
        return self.stream.arrive(msg, client_identity(msg))

    def admit(self, msg: Message) -> ClientUpdate:
        """A training reply's update after every check the buffered merge would make."""
        self.policy.check_role(msg)
        update = self.client_update(msg)
        check_client(self.global_state, update.state, update.weight, update.name)
        return update

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        server_round = self.real_round(server_round)
        self.follow_policy()
        if self.fraction_evaluate > 0:
            self.policy.wait(grid, f"round {server_round}")
        return self.policy.sending(super().configure_evaluate(server_round, self.sent_down(arrays, config), config, self.policy.reachable(grid)))

    def follow_policy(self) -> None:
        """Wait for, and sample, only the nodes the policy still expects (fewer after a loss in continue mode)."""
        self.min_available_nodes = self.min_train_nodes = self.policy.num_nodes
        if self.min_evaluate_nodes:
            self.min_evaluate_nodes = self.policy.num_nodes

    def client_update(self, msg: Message) -> ClientUpdate:
        statistic = self.setting.rule.statistic
        stats = record_views(msg.content[statistic.name]) if statistic and statistic.name in msg.content else {}
        name = describe_client(msg)
        state = record_views(msg.content[self.arrayrecord_key])
        check_own_head(msg, state)
        check_complete(msg, state, self.global_state, freeze_lora_a=self.setting.rule.adapters == "frozen-a", embeddings=self.embeddings_sent)
        check_metrics(msg)
        update = ClientUpdate(name, client_identity(msg) or name, state, self.policy.claimed_examples(msg), stats)
        check_magnitude(name, update.state, FLOAT32_MAX / ((self.policy.max_examples or update.weight) * max(self.policy.num_nodes, 1)))
        return update

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round = self.real_round(server_round)
        usable = sorted(self.policy.usable(server_round, "train", list(replies)), key=lambda m: client_identity(m) or "")
        context = MergeContext(server_round, self.seed, self.num_heads, server_text=self.server_text, adapter_scale=self.adapter_scale)
        merged = dict(self.global_state)
        if self.stream is not None:
            streamed, updates = self.stream.finish(client_identity(m) or "" for m in usable)
            merged.update(streamed)
        else:
            updates = [self.client_update(msg) for msg in usable]
            merged.update(self.setting.merge(self.global_state, updates, context))
        check_merged(server_round, merged, updates)
        entry: dict[str, object] = {
            "round": server_round,
            "clients": [
                {"client": u.name, **dict(m.content["metrics"].items()), "bytes-sent": client_bytes(self.stream, m, u.identity), **context.notes.get(u.name, {})}
                for u, m in zip(updates, usable)
            ],
            "lost": self.policy.lost_nodes.setdefault(server_round, []),  # the same list: evaluation losses join it
            **context.round_notes,
        }
        if self.sampled:
            entry["sampled"] = self.sampled
        self.client_history.append(entry)
        metrics = self.train_metrics_aggr_fn([m.content for m in usable], self.weighted_by_key)
        del updates
        for msg in usable:  # Flower's loop keeps this round's replies until the next round's arrive
            drop_arrays(msg)
        self.stream = None
        return ArrayRecord(merged, keep_input=False), metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round = self.real_round(server_round)
        usable = self.policy.usable(server_round, "evaluate", list(replies))
        for msg in usable:
            check_evaluation(msg, self.max_eval_examples)
        metrics = super().aggregate_evaluate(server_round, usable)
        if metrics is not None:
            self.client_evaluations[server_round] = dict(metrics)
        return metrics


def check_magnitude(name: str, state: dict[str, torch.Tensor], limit: float) -> None:
    """Refuse finite values so large that the weighted float32 sum of a round could overflow (1e36 passes every
    finiteness check; trained weights are of order 1)."""
    for key, value in state.items():
        if value.is_floating_point() and value.numel() and (largest := max(abs(float(x)) for x in torch.aminmax(value))) > limit:
            raise UpdateError(f"{name}: key '{key}' holds values up to {largest:.3g}: expected at most {limit:.3g} in magnitude (a round's float32 sum could overflow)")


def check_merged(server_round: int, merged: dict[str, torch.Tensor], updates: list[ClientUpdate]) -> None:
    """Every merged float tensor finite; finite replies can still overflow a float32 sum (values near 1e36)."""
    for key, value in merged.items():
        if value.is_floating_point() and not all_finite(value):
            senders = [(float(u.state[key].abs().max()), u.name) for u in updates if key in u.state]
            largest, name = max(senders, default=(math.nan, "no client"))
            raise UpdateError(f"round {server_round}: merged '{key}' is not finite: {name} sent values up to {largest:.3g} (largest of the round)")

