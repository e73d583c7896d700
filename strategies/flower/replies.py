"""Which replies of a round may be merged: failed and silent nodes, lost-node policy, claimed example counts.

Flower's default is to log "Received 0 results and N failures", keep the old weights and carry on. Here a
round (training, client evaluation, or the label query of a server without data) with a failed or missing
node raises ``RoundFailed`` naming every such node. With ``continue_on_loss`` a node that is lost (no
heartbeat, a crashed ClientApp, no reply in time) is dropped instead: the round goes on with the remaining
replies, the loss is logged and recorded per round, and later rounds stop waiting for it. A ClientApp that
raised still fails the run: that is a bug, not a loss. A reply's claimed ``num-examples`` is its averaging
weight, so one above what a round's steps allow is refused: it would let one client own the global model.

A client's claim about whom it serves is trusted once: the first reply of a node binds it to its
"<domain>-<partition>", and a later reply of that node claiming another is refused, as is a training reply that
carries another domain's head (a bio client could otherwise overwrite the legal head). Client evaluation
replies are checked too (accuracy in [0, 1], finite loss, at most the test set's examples): with a server
that holds no data they are the only scores.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping

from flwr.app import Message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from strategies.aggregation import UpdateError
from strategies.lora import client_keys, has_adapters

log = logging.getLogger(__name__)

# Errors the SuperLink or the node's runtime writes when a node or its ClientApp process is gone, as opposed
# to the ClientApp raising (codes 1, 2) or refusing the app (6, 7).
LOST_NODE_CODES = frozenset(
    {ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE, ErrorCode.NODE_UNAVAILABLE, ErrorCode.CLIENT_APP_CRASHED}
)


class RoundFailed(RuntimeError):
    """A round cannot produce a trustworthy result."""


def describe_client(msg: Message) -> str:
    return f"node {msg.metadata.src_node_id} ({client_identity(msg) or '?'})"


def client_identity(msg: Message) -> str | None:
    """The client's stable name, "<domain>-<partition>", from its ``client`` record (node ids change per run)."""
    info = msg.content.config_records.get("client") if msg.has_content() else None
    return f"{info['domain']}-{info['partition-id']}" if info and "domain" in info else None


def error_text(reason: str) -> str:
    """The client's own exception message, without Flower's wrapping: "... occurred. Message: TEXT'>" (simulation)
    or "<class 'ConfigError'>:<'TEXT'>" (a SuperNode)."""
    flat = " ".join(reason.split())
    tail = flat.rsplit("Message: ", 1)[-1]
    if tail.startswith("<class '") and ">:<'" in tail:
        tail = tail.split(">:<'", 1)[1]
    return tail.removesuffix("'>")[-500:]


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


class ReplyPolicy:
    """Remembers what a stage sent and which nodes serve whom, and decides which of its replies are usable."""

    def __init__(
        self,
        num_nodes: int,
        reply_timeout: float = 3600.0,
        continue_on_loss: bool = False,
        max_examples: int | None = None,
        weighted_by_key: str = "num-examples",
        abandon: Callable[[list[str]], object] | None = None,
    ) -> None:
        self.num_nodes = num_nodes  # nodes a round waits for; lowered when a node is dropped in continue mode
        self.reply_timeout = reply_timeout  # also how long a round waits for lost nodes to come back
        self.continue_on_loss = continue_on_loss
        self.max_examples = max_examples  # the most examples one client can train on in a round (steps x batch)
        self.weighted_by_key = weighted_by_key
        self.lost_nodes: dict[int, list[dict[str, str]]] = {}  # continue mode: round -> stage, node, reason of each loss
        self.node_names: dict[int, str] = {}  # node id -> "node ID (domain-partition)", from earlier replies
        self.node_roles: dict[int, str] = {}  # node id -> "domain-partition" it claimed first; later claims must agree
        self.sent: list[Message] = []  # this stage's messages; the Grid sets their ids as it pushes them
        self.lost_ids: set[int] = set()  # continue mode: nodes found lost, never sent anything again in this run
        self.abandon = abandon  # stops the clients of messages given up on (simulation: kills their actors)

    def wait(self, grid: Grid, stage: str) -> list[int]:
        return wait_for_nodes(self.reachable(grid), self.num_nodes, self.reply_timeout, stage, self.node_names)

    def reachable(self, grid: Grid) -> Grid:
        """The grid as a round sees it: without the nodes found lost (a simulation still lists them)."""
        return WithoutNodes(grid, self.lost_ids) if self.lost_ids else grid

    def sending(self, messages: Iterable[Message]) -> list[Message]:
        """Remember a stage's messages (to name a node that does not answer); returns them as a list."""
        self.sent = list(messages)
        return self.sent

    def node_of(self, reply: Message) -> str:
        """The client a reply is about, found through the message it answers."""
        node = self.sent_to(reply)
        return self.node_name(node) if node is not None else describe_client(reply)

    def node_name(self, node: int) -> str:
        return self.node_names.get(node, f"node {node}")

    def usable(self, server_round: int, stage: str, replies: list[Message], waited: float | None = None) -> list[Message]:
        """The replies to use: all of them, or RoundFailed naming every failed or silent node; in continue
        mode lost nodes are dropped (and remembered) as long as one client answered and none raised. The
        clients of silent messages are abandoned first, so nothing of this round still runs. ``waited``: how long
        the replies were waited for, when not the reply timeout (the roll call waits longer)."""
        waited = self.reply_timeout if waited is None else waited
        for msg in replies:
            if not msg.has_error():
                self.check_role(msg)
                self.node_names[msg.metadata.src_node_id] = describe_client(msg)
        failed = [m for m in replies if m.has_error()]
        ok = [m for m in replies if not m.has_error()]
        raised = [m for m in failed if m.error.code not in LOST_NODE_CODES]
        answered = {m.metadata.reply_to_message_id for m in replies}
        missing = len(replies) < len(self.sent)
        silent = [m for m in self.sent if missing and m.metadata.message_id and m.metadata.message_id not in answered]
        unsent = [m for m in self.sent if missing and not m.metadata.message_id]  # the round's time ran out before they left
        if silent and self.abandon is not None:
            self.abandon([m.metadata.message_id for m in silent])
        if self.continue_on_loss and ok and not raised:
            if failed or silent:
                self.drop_lost(server_round, stage, failed, silent, len(ok), waited)
            return ok
        if failed:
            reasons = "; ".join(f"{self.node_of(m)}: {error_text(m.error.reason)}" for m in failed)
            hint = "" if raised or self.continue_on_loss else " (on-node-loss=continue would finish rounds with the remaining clients)"
            raise RoundFailed(f"{stage_name(server_round, stage)}: {len(failed)} of {len(replies)} clients failed: {reasons}{hint}")
        if silent or unsent:
            names = [self.node_name(m.metadata.dst_node_id) for m in silent]
            hint = " (on-node-loss=continue would finish rounds with the remaining clients)" if silent and not self.continue_on_loss else ""
            waiting = f"; {len(unsent)} not yet sent when the time ran out" if unsent else ""
            raise RoundFailed(
                f"{stage_name(server_round, stage)}: {len(replies)} replies for {len(self.sent)} clients after "
                f"{describe_wait(waited, self.reply_timeout)}{': no reply from ' if names else ''}{', '.join(names)}{waiting}{hint}"
            )
        return ok

    def check_role(self, msg: Message) -> None:
        """Bind a node to the domain and partition its first reply claimed; refuse a reply that changes them."""
        role = client_identity(msg)
        if role is None:
            raise UpdateError(f"{describe_client(msg)}: reply names no domain (no 'client' record)")
        bound = self.node_roles.setdefault(msg.metadata.src_node_id, role)
        if bound != role:
            raise UpdateError(f"node {msg.metadata.src_node_id}: claims to be {role}, but served {bound} in an earlier reply: refused")

    def drop_lost(self, server_round: int, stage: str, failed: list[Message], silent: list[Message], remaining: int, waited: float) -> None:
        """Record and log the lost nodes; later rounds neither wait for them nor send them anything."""
        losses = [(self.sent_to(m), error_text(m.error.reason)) for m in failed]
        losses += [(m.metadata.dst_node_id, f"no reply within {describe_wait(waited, self.reply_timeout)}") for m in silent]
        for node, reason in losses:
            if node is not None:
                self.lost_ids.add(node)
            name = self.node_name(node) if node is not None else "a node"
            self.lost_nodes.setdefault(server_round, []).append({"stage": stage, "node": name, "reason": reason})
            log.warning("round %d %s: lost %s (%s); continuing with %d clients", server_round, stage, name, reason, remaining)
        self.num_nodes -= len(losses)  # not `remaining`: a sampled round asked only some of the nodes

    def sent_to(self, reply: Message) -> int | None:
        """The node a reply answers for (the SuperLink answers for a node that stopped sending heartbeats)."""
        for msg in self.sent:
            if msg.metadata.message_id == reply.metadata.reply_to_message_id:
                return msg.metadata.dst_node_id
        return None

    def claimed_examples(self, msg: Message) -> float:
        """A reply's averaging weight, refused when no client could have trained on that many examples."""
        metrics = msg.content["metrics"]
        if self.weighted_by_key not in metrics:
            raise UpdateError(f"{describe_client(msg)}: sent no '{self.weighted_by_key}'")
        weight = float(metrics[self.weighted_by_key])
        if not (math.isfinite(weight) and weight > 0):
            raise UpdateError(f"{describe_client(msg)}: {self.weighted_by_key} {weight:g}: expected a number > 0")
        if self.max_examples is not None and weight > self.max_examples:
            raise UpdateError(
                f"{describe_client(msg)}: {self.weighted_by_key} {weight:g}: expected at most {self.max_examples}"
                " (local-steps x batch-size)"
            )
        return weight


def describe_wait(waited: float, reply_timeout: float) -> str:
    """How long replies were waited for, as an error message says it."""
    return f"the reply timeout of {reply_timeout:g} s" if waited == reply_timeout else f"{waited:g} s (the roll call's wait: clients start)"


def check_complete(msg: Message, keys: Iterable[str], global_keys: Iterable[str], *, freeze_lora_a: bool = False, embeddings: bool = True) -> None:
    """A client must send every key it trains (``client_keys``): the encoder, or its adapters, and its own head. A
    missing key would otherwise be merged from the other clients alone, without a word."""
    domain = str(msg.content["client"]["domain"])
    sent = set(keys)
    missing = sorted(k for k in client_keys(global_keys, domain, freeze_a=freeze_lora_a, embeddings=embeddings) if k not in sent)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        part = "adapters" if has_adapters(global_keys) else "encoder"
        raise UpdateError(f"{describe_client(msg)}: the reply lacks key '{missing[0]}'{more}: expected the {part} and the '{domain}' head")


def check_metrics(msg: Message, counts: Iterable[str] = ("num-examples",)) -> None:
    """Every metric of a reply is a real number (not a string or a boolean), and each of `counts` an integer:
    checked before anything reads them, so a bad value is refused naming the node instead of failing inside
    Flower's metric aggregation."""
    metrics = msg.content["metrics"] if "metrics" in msg.content else {}
    for key, value in metrics.items():
        wanted = int if key in counts else (int, float)
        if isinstance(value, bool) or not isinstance(value, wanted):
            expected = "an integer" if key in counts else "a real number"
            raise UpdateError(f"{describe_client(msg)}: metric '{key}' is {value!r} ({type(value).__name__}): expected {expected}")


def check_own_head(msg: Message, keys: Iterable[str]) -> None:
    """A client trains the shared encoder and its own domain's head, so it may send only those."""
    domain = str(msg.content["client"]["domain"])
    foreign = sorted(k for k in keys if k.startswith("heads.") and not k.startswith(f"heads.{domain}."))
    if foreign:
        raise UpdateError(f"{describe_client(msg)}: a '{domain}' client sent another domain's head ({', '.join(foreign)}): refused")


def check_evaluation(msg: Message, max_examples: int | None) -> None:
    """A client's evaluation reply: accuracy in [0, 1], a finite loss >= 0, 1..max_examples test examples."""
    check_metrics(msg)
    metrics = msg.content["metrics"] if "metrics" in msg.content else {}
    expected = {"eval-accuracy": (0.0, 1.0), "eval-loss": (0.0, math.inf), "num-examples": (1.0, float(max_examples or math.inf))}
    for key, (low, high) in expected.items():
        if key not in metrics:
            raise UpdateError(f"{describe_client(msg)}: evaluation reply has no '{key}'")
        value = float(metrics[key])
        if not (math.isfinite(value) and low <= value <= high):
            raise UpdateError(f"{describe_client(msg)}: {key} {value:g}: expected a finite number in [{low:g}, {high:g}]")


class WithoutNodes:
    """A Grid that does not list some of its nodes; every other attribute is the wrapped grid's."""

    def __init__(self, grid: Grid, hidden: set[int]) -> None:
        self.grid = grid
        self.hidden = hidden

    def get_node_ids(self) -> list[int]:
        return [node for node in self.grid.get_node_ids() if node not in self.hidden]

    def __getattr__(self, name: str) -> object:
        return getattr(self.grid, name)


def stage_name(server_round: int, stage: str) -> str:
    return f"round {server_round} {stage}" if server_round > 0 else stage
