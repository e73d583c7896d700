"""Thin Flower strategies that merge with fedmerge's key-wise rule instead of Flower's plain mean.

Each client returns the encoder plus the head of its own domain. Every returned key is averaged over
the clients that sent it, weighted by ``num-examples``, so a domain head is never diluted by clients
that did not train it; keys nobody sent keep their global value. Replies are checked before anything
is averaged (keys, shapes, dtypes and finite values against the global model; a ``num-examples`` above what
a round's steps allow), and a round (training or client evaluation) with a failed or
missing client raises instead of silently keeping the old weights (Flower's default), naming the node.
With ``continue_on_loss`` a node that is lost (no heartbeat, a crashed ClientApp, no reply in time) is
dropped instead: the round merges the remaining replies, the loss is logged and recorded per round, and
later rounds stop waiting for it. A ClientApp that raises still fails the run: that is a bug, not a loss.
Client evaluations are averaged per domain.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from strategies.aggregation import StreamingMean, UpdateError, as_tensors, check_update
from strategies.permutation import apply_permutation, match_weights, permutation_spec
from strategies.records import record_views

log = logging.getLogger(__name__)


class RoundFailed(RuntimeError):
    """A training round cannot produce a trustworthy global model."""


# Errors the SuperLink or the node's runtime writes when a node or its ClientApp process is gone, as opposed
# to the ClientApp raising (codes 1, 2) or refusing the app (6, 7).
LOST_NODE_CODES = frozenset(
    {ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE, ErrorCode.NODE_UNAVAILABLE, ErrorCode.CLIENT_APP_CRASHED}
)


def describe_client(msg: Message) -> str:
    info = msg.content.config_records.get("client") if msg.has_content() else None
    name = f"{info['domain']}-{info['partition-id']}" if info and "domain" in info else "?"
    return f"node {msg.metadata.src_node_id} ({name})"


def error_text(reason: str) -> str:
    """The client's own exception message, without Flower's wrapping: "... occurred. Message: TEXT'>" (simulation)
    or "<class 'ConfigError'>:<'TEXT'>" (a SuperNode)."""
    flat = " ".join(reason.split())
    tail = flat.rsplit("Message: ", 1)[-1]
    if tail.startswith("<class '") and ">:<'" in tail:
        tail = tail.split(">:<'", 1)[1]
    return tail.removesuffix("'>")[-500:]


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


def wait_for_nodes(grid: Grid, needed: int, timeout: float, stage: str, known: Mapping[int, str]) -> list[int]:
    """The connected nodes once `needed` are; Flower's sampling waits forever, this fails after `timeout`
    seconds naming the known nodes that are gone."""
    deadline = time.monotonic() + timeout
    while len(online := list(grid.get_node_ids())) < needed:
        if time.monotonic() > deadline:
            lost = [name for node, name in known.items() if node not in online]
            raise RoundFailed(
                f"{stage}: {len(online)} of {needed} nodes connected after {timeout:.0f} s" + (f"; lost: {', '.join(lost)}" if lost else "")
            )
        time.sleep(1)
    return online


class KeywiseMerge:
    """Mixin over a Flower FedAvg-family strategy: remembers the global model, merges key-wise."""

    arrayrecord_key: str
    weighted_by_key: str

    def __init__(
        self,
        *args: object,
        reply_timeout: float = 3600.0,
        continue_on_loss: bool = False,
        max_examples: int | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.max_examples = max_examples  # the most examples one client can train on in a round (steps x batch)
        self.reply_timeout = reply_timeout  # also how long a round waits for lost nodes to come back
        self.continue_on_loss = continue_on_loss
        self.lost_nodes: dict[int, list[dict[str, str]]] = {}  # continue mode: round -> stage, node, reason of each loss
        self.global_state: dict[str, torch.Tensor] = {}
        self.client_history: list[dict[str, object]] = []
        self.sent: list[Message] = []  # this stage's messages; the Grid sets their ids as it pushes them
        self.node_names: dict[int, str] = {}  # node id -> "node ID (domain-partition)", from earlier replies
        self.merge_notes: dict[str, dict[str, object]] = {}  # this round: client -> what merging found (results.json)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.global_state = arrays.to_torch_state_dict()
        wait_for_nodes(grid, self.min_available_nodes, self.reply_timeout, f"round {server_round}", self.node_names)  # type: ignore[attr-defined]
        self.sent = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
        self.expected_replies = len(self.sent)
        return self.sent

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if self.fraction_evaluate > 0:  # type: ignore[attr-defined]
            wait_for_nodes(grid, self.min_available_nodes, self.reply_timeout, f"round {server_round}", self.node_names)  # type: ignore[attr-defined]
        self.sent = list(super().configure_evaluate(server_round, arrays, config, grid))  # type: ignore[misc]
        self.expected_replies = len(self.sent)
        return self.sent

    def node_of(self, reply: Message) -> str:
        """The client a reply is about. The SuperLink itself answers for a node that stopped sending
        heartbeats, so the node is found through the message the reply answers."""
        for msg in self.sent:
            if msg.metadata.message_id == reply.metadata.reply_to_message_id:
                return self.node_name(msg.metadata.dst_node_id)
        return describe_client(reply)

    def node_name(self, node: int) -> str:
        return self.node_names.get(node, f"node {node}")

    def usable_replies(self, server_round: int, stage: str, replies: list[Message]) -> list[Message]:
        """The replies to merge: all of them, or RoundFailed naming every failed or silent node; in continue
        mode lost nodes are dropped (and remembered) as long as one client answered and none raised."""
        for msg in replies:
            if not msg.has_error():
                self.node_names[msg.metadata.src_node_id] = describe_client(msg)
        failed = [m for m in replies if m.has_error()]
        ok = [m for m in replies if not m.has_error()]
        raised = [m for m in failed if m.error.code not in LOST_NODE_CODES]
        missing = len(replies) < self.expected_replies
        answered = {m.metadata.reply_to_message_id for m in replies}
        silent = [self.node_name(m.metadata.dst_node_id) for m in self.sent if m.metadata.message_id not in answered]
        if self.continue_on_loss and ok and not raised:
            if failed or missing:
                self.drop_lost(server_round, stage, failed, silent, len(ok))
            return ok
        if failed:
            reasons = "; ".join(f"{self.node_of(m)}: {error_text(m.error.reason)}" for m in failed)
            hint = "" if raised or self.continue_on_loss else " (on-node-loss=continue would finish rounds with the remaining clients)"
            raise RoundFailed(f"round {server_round} {stage}: {len(failed)} of {len(replies)} clients failed: {reasons}{hint}")
        if missing:
            raise RoundFailed(
                f"round {server_round} {stage}: {len(replies)} replies for {self.expected_replies} clients "
                f"(timeout or lost node{': ' if silent else ''}{', '.join(silent)})"
            )
        return ok

    def drop_lost(self, server_round: int, stage: str, failed: list[Message], silent: list[str], remaining: int) -> None:
        """Record and log the lost nodes, and let later rounds start with the nodes that are left."""
        losses = [(self.node_of(m), error_text(m.error.reason)) for m in failed] + [(n, "no reply in time") for n in silent]
        for node, reason in losses:
            self.lost_nodes.setdefault(server_round, []).append({"stage": stage, "node": node, "reason": reason})
            log.warning("round %d %s: lost %s (%s); continuing with %d clients", server_round, stage, node, reason, remaining)
        self.min_available_nodes = self.min_train_nodes = min(self.min_train_nodes, remaining)  # type: ignore[attr-defined, has-type]
        if self.min_evaluate_nodes:  # type: ignore[attr-defined, has-type]
            self.min_evaluate_nodes = min(self.min_evaluate_nodes, remaining)  # type: ignore[has-type]

    def client_states(self, replies: list[Message]) -> Iterable[tuple[dict[str, torch.Tensor], float]]:
        """Decode one client at a time (peak memory: one client copy), checked against the global model."""
        for msg in replies:
            state = as_tensors(record_views(msg.content[self.arrayrecord_key]))
            check_update(self.global_state, state, describe_client(msg))
            yield state, self.claimed_examples(msg)

    def claimed_examples(self, msg: Message) -> float:
        """A reply's averaging weight, refused when no client could have trained on that many examples: one
        client claiming a million examples would otherwise own the global model."""
        weight = float(msg.content["metrics"][self.weighted_by_key])
        if not (math.isfinite(weight) and weight > 0):
            raise UpdateError(f"{describe_client(msg)}: {self.weighted_by_key} {weight:g}: expected a number > 0")
        if self.max_examples is not None and weight > self.max_examples:
            raise UpdateError(
                f"{describe_client(msg)}: {self.weighted_by_key} {weight:g}: expected at most {self.max_examples}"
                " (local-steps x batch-size)"
            )
        return weight

    def merge(self, server_round: int, replies: list[Message]) -> dict[str, torch.Tensor]:
        """Key-wise weighted mean; subclasses (alignment) transform client states first."""
        mean = StreamingMean()
        for state, weight in self.client_states(replies):
            mean.add(state, weight)
        return mean.result()

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = self.usable_replies(server_round, "train", list(replies))
        for msg in replies:
            if self.weighted_by_key not in msg.content["metrics"]:
                raise RoundFailed(f"round {server_round}: {describe_client(msg)} sent no '{self.weighted_by_key}'")
        merged = dict(self.global_state)
        self.merge_notes = {}
        merged.update(self.merge(server_round, replies))
        self.client_history.append(
            {
                "round": server_round,
                "clients": [
                    {"client": describe_client(m), **dict(m.content["metrics"].items()), **self.merge_notes.get(describe_client(m), {})}
                    for m in replies
                ],
                "lost": self.lost_nodes.setdefault(server_round, []),  # the same list: evaluation losses join it
            }
        )
        metrics = self.train_metrics_aggr_fn([m.content for m in replies], self.weighted_by_key)  # type: ignore[attr-defined]
        return ArrayRecord(merged, keep_input=False), metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = self.usable_replies(server_round, "evaluate", list(replies))
        return super().aggregate_evaluate(server_round, replies)  # type: ignore[misc]


class MergeFedAvg(KeywiseMerge, FedAvg):
    """FedAvg (McMahan et al. 2017) with key-wise, head-aware merging."""


class MergeFedProx(KeywiseMerge, FedProx):
    """FedProx (Li et al. 2020): sends ``proximal-mu``; the client adds mu/2 * ||w - w_global||^2 to its loss."""


class MergeAligned(KeywiseMerge, FedAvg):
    """Permutation-aligned averaging (Git Re-Basin weight matching, Ainsworth et al. 2022, arXiv 2209.04836).

    Each client's weights are first permuted to line up with the current global model (heads as blocks,
    within-head dimensions, FFN units and optionally the residual stream), then averaged as FedAvg does.
    """

    def __init__(self, *args: object, num_heads: int, residual: bool, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.num_heads = num_heads
        self.residual = residual

    def merge(self, server_round: int, replies: list[Message]) -> dict[str, torch.Tensor]:
        spec = permutation_spec(self.global_state, self.num_heads, residual=self.residual)
        mean = StreamingMean()
        for (state, weight), msg in zip(self.client_states(replies), replies):
            perms = match_weights(self.global_state, state, spec, seed=server_round)
            moved = sum(int((p != torch.arange(len(p))).sum()) for p in perms.values())
            self.merge_notes[describe_client(msg)] = {"moved-units": moved}  # how far the client was from identity
            log.info("aligned: round %d %s: %d units moved", server_round, describe_client(msg), moved)
            mean.add(apply_permutation(state, spec, perms), weight)
        return mean.result()


def make_strategy(
    name: str,
    num_clients: int,
    proximal_mu: float,
    client_eval: bool,
    num_heads: int = 0,
    align_residual: bool = True,
    reply_timeout: float = 3600.0,
    continue_on_loss: bool = False,
    max_examples: int | None = None,
) -> FedAvg:
    """Build a registered strategy that trains every client each round."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy '{name}': expected one of {', '.join(STRATEGIES)}")
    common: dict[str, object] = {
        "fraction_train": 1.0,
        "min_train_nodes": num_clients,
        "min_available_nodes": num_clients,
        "fraction_evaluate": 1.0 if client_eval else 0.0,
        "min_evaluate_nodes": num_clients if client_eval else 0,
        "evaluate_metrics_aggr_fn": per_domain_metrics,
        "reply_timeout": reply_timeout,
        "continue_on_loss": continue_on_loss,
        "max_examples": max_examples,
    }
    if name == "fedprox":
        return MergeFedProx(proximal_mu=proximal_mu, **common)
    if name == "aligned":
        return MergeAligned(num_heads=num_heads, residual=align_residual, **common)
    return STRATEGIES[name](**common)


STRATEGIES: Mapping[str, type[FedAvg]] = {"fedavg": MergeFedAvg, "fedprox": MergeFedProx, "aligned": MergeAligned}
