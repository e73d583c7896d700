"""One Flower strategy that merges with any registered rule: Flower's FedAvg round loop, fedmerge's merge.

Flower's ``Strategy.start`` runs the rounds; this class only fills its hooks. ``configure_train`` remembers the
global model and tells the clients what the rule needs from them (FedProx's mu, which statistic to send);
``aggregate_train`` keeps the usable replies (``strategies.replies``), reads each as a zero-copy view of its
bytes, and merges with the rule (``strategies.rules``), which checks every client first. Every returned key is
merged over the clients that sent it, so a domain head is never diluted by clients that did not train it; keys
nobody sent keep their global value. Replies are merged in the order of their clients' names, not of arrival,
so the same seed gives the same sums. Client evaluations are averaged per domain.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from strategies.records import record_views
from strategies.replies import ReplyPolicy, client_identity, describe_client
from strategies.rules import RuleSetting
from strategies.update import ClientUpdate, MergeContext


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


def bytes_sent(msg: Message) -> dict[str, int]:
    """Bytes of every array record of a reply (weights, statistics), as they crossed the network."""
    return {name: sum(len(array.data) for array in record.values()) for name, record in msg.content.array_records.items()}


class RuleStrategy(FedAvg):
    """Trains every client each round and merges their replies with ``setting``'s rule."""

    def __init__(
        self,
        setting: RuleSetting,
        num_clients: int,
        client_eval: bool,
        policy: ReplyPolicy,
        num_heads: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(
            fraction_train=1.0,
            min_train_nodes=num_clients,
            min_available_nodes=num_clients,
            fraction_evaluate=1.0 if client_eval else 0.0,
            min_evaluate_nodes=num_clients if client_eval else 0,
            evaluate_metrics_aggr_fn=per_domain_metrics,
        )
        self.setting = setting
        self.policy = policy
        self.num_heads = num_heads
        self.seed = seed
        self.global_state: dict[str, torch.Tensor] = {}
        self.client_history: list[dict[str, object]] = []

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.global_state = arrays.to_torch_state_dict()
        self.follow_policy()
        self.policy.wait(grid, f"round {server_round}")
        for key, value in self.setting.client_config().items():
            config[key] = value
        return self.policy.sending(super().configure_train(server_round, arrays, config, grid))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.follow_policy()
        if self.fraction_evaluate > 0:
            self.policy.wait(grid, f"round {server_round}")
        return self.policy.sending(super().configure_evaluate(server_round, arrays, config, grid))

    def follow_policy(self) -> None:
        """Wait for, and sample, only the nodes the policy still expects (fewer after a loss in continue mode)."""
        self.min_available_nodes = self.min_train_nodes = self.policy.num_nodes
        if self.min_evaluate_nodes:
            self.min_evaluate_nodes = self.policy.num_nodes

    def client_update(self, msg: Message) -> ClientUpdate:
        statistic = self.setting.rule.statistic
        stats = record_views(msg.content[statistic.name]) if statistic and statistic.name in msg.content else {}
        name = describe_client(msg)
        return ClientUpdate(name, client_identity(msg) or name, record_views(msg.content[self.arrayrecord_key]), self.policy.claimed_examples(msg), stats)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        usable = sorted(self.policy.usable(server_round, "train", list(replies)), key=lambda m: client_identity(m) or "")
        updates = [self.client_update(msg) for msg in usable]
        context = MergeContext(server_round, self.seed, self.num_heads)
        merged = dict(self.global_state)
        merged.update(self.setting.merge(self.global_state, updates, context))
        self.client_history.append(
            {
                "round": server_round,
                "clients": [
                    {"client": u.name, **dict(m.content["metrics"].items()), "bytes-sent": bytes_sent(m), **context.notes.get(u.name, {})}
                    for u, m in zip(updates, usable)
                ],
                "lost": self.policy.lost_nodes.setdefault(server_round, []),  # the same list: evaluation losses join it
            }
        )
        metrics = self.train_metrics_aggr_fn([m.content for m in usable], self.weighted_by_key)
        return ArrayRecord(merged, keep_input=False), metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return super().aggregate_evaluate(server_round, self.policy.usable(server_round, "evaluate", list(replies)))


def make_strategy(
    setting: RuleSetting,
    num_clients: int,
    client_eval: bool,
    num_heads: int | None = None,
    seed: int = 0,
    reply_timeout: float = 3600.0,
    continue_on_loss: bool = False,
    max_examples: int | None = None,
) -> RuleStrategy:
    """The strategy of one run: ``setting``'s rule, its reply policy, every client trained each round."""
    policy = ReplyPolicy(num_clients, reply_timeout, continue_on_loss, max_examples)
    return RuleStrategy(setting, num_clients, client_eval, policy, num_heads, seed)
