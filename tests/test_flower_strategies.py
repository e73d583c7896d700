"""The Flower strategy (one class driving any rule): key-wise merging of replies, loud failures, aligned == FedAvg
near identity, bytes recorded per client."""

from dataclasses import dataclass, field

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from transformers import AutoModel

from strategies.aggregation import UpdateError
from strategies.flower.replies import RoundFailed, error_text, wait_for_nodes
from strategies.flower.strategy import RoundSettings, RuleStrategy, per_domain_metrics
from strategies.options import OptionError
from strategies.rules import parse_names, settings
from tests.conftest import tiny_bert_config


@dataclass
class FakeError:
    reason: str
    code: int = ErrorCode.CLIENT_APP_RAISED_EXCEPTION


@dataclass
class FakeMetadata:
    src_node_id: int
    reply_to_message_id: str = ""
    message_id: str = ""
    dst_node_id: int = 0


@dataclass
class FakeReply:
    """The parts of a Flower reply Message that aggregate_train reads."""

    content: RecordDict | None
    node: int
    error: FakeError | None = None
    metadata: FakeMetadata = field(init=False)

    def __post_init__(self) -> None:
        self.metadata = FakeMetadata(self.node)

    def has_error(self) -> bool:
        return self.error is not None

    def has_content(self) -> bool:
        return self.content is not None


def reply(
    state: dict[str, torch.Tensor], examples: int, domain: str, node: int, own_head: bool = True, **statistics: dict[str, torch.Tensor]
) -> FakeReply:
    if own_head and "encoder.w" in state:  # a toy reply: the client's own head, where the test leaves it out
        state = {f"heads.{domain}.weight": torch.zeros(1), **state}
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: v.clone() for k, v in state.items()}),
            "metrics": MetricRecord({"train-loss": 1.0, "num-examples": examples}),
            "client": ConfigRecord({"domain": domain, "partition-id": 0}),
            **{name: ArrayRecord(values) for name, values in statistics.items()},
        }
    )
    return FakeReply(content, node)


def rule(name: str, **values: object):
    return settings([name], values)[0]


def strategy_with_global(name: str, global_state: dict[str, torch.Tensor], clients: int, continue_on_loss: bool = False, **kw):
    strategy = RuleStrategy(rule(name), RoundSettings(clients, num_heads=4, continue_on_loss=continue_on_loss, **kw))
    strategy.global_state = global_state
    strategy.policy.sent = [FakeReply(None, 0) for _ in range(clients)]  # what configure_train would have sent
    for i, msg in enumerate(strategy.policy.sent):
        msg.metadata.message_id = f"sent-{i}"
    return strategy


def toy_global() -> dict[str, torch.Tensor]:
    return {"encoder.w": torch.zeros(2), "heads.bio.weight": torch.zeros(1), "heads.legal.weight": torch.zeros(1)}


def test_fedavg_strategy_merges_key_wise_and_keeps_unsent_keys() -> None:
    strategy = strategy_with_global("fedavg", {**toy_global(), "heads.other.weight": torch.full((1,), 7.0)}, 3)
    replies = [
        reply({"encoder.w": torch.tensor([1.0, 2.0]), "heads.bio.weight": torch.tensor([1.0])}, 10, "bio", 1),
        reply({"encoder.w": torch.tensor([3.0, 6.0]), "heads.bio.weight": torch.tensor([3.0])}, 30, "bio", 2),
        reply({"encoder.w": torch.tensor([5.0, 10.0]), "heads.legal.weight": torch.tensor([9.0])}, 60, "legal", 3),
    ]

    arrays, _ = strategy.aggregate_train(1, replies)
    merged = arrays.to_torch_state_dict()

    assert torch.allclose(merged["encoder.w"], torch.tensor([0.1 * 1 + 0.3 * 3 + 0.6 * 5, 0.1 * 2 + 0.3 * 6 + 0.6 * 10]))
    assert torch.allclose(merged["heads.bio.weight"], torch.tensor([0.25 * 1 + 0.75 * 3]))
    assert torch.equal(merged["heads.legal.weight"], torch.tensor([9.0]))
    assert torch.equal(merged["heads.other.weight"], torch.tensor([7.0]))


def test_a_failed_client_fails_the_round_naming_the_node() -> None:
    strategy = strategy_with_global("fedprox", toy_global(), 2)
    ok = reply({"encoder.w": torch.ones(2)}, 5, "bio", 1)
    failed = FakeReply(None, 42, FakeError("Exception ClientAppException occurred. Message: disk full"))

    with pytest.raises(RoundFailed, match="node 42.*disk full"):
        strategy.aggregate_train(1, [ok, failed])


def test_a_missing_reply_fails_the_round() -> None:
    strategy = strategy_with_global("fedavg", toy_global(), 2)

    with pytest.raises(RoundFailed, match="1 replies for 2 clients"):
        strategy.aggregate_train(1, [reply({"encoder.w": torch.ones(2)}, 5, "bio", 1)])


def bio_answers_legal_is_lost(strategy, lost_code: int = ErrorCode.NODE_UNAVAILABLE):
    """Node 7 (bio) replies with encoder 1s; node 9 (legal) is answered for by the SuperLink (node 1)."""
    sent = [FakeReply(None, 0), FakeReply(None, 0)]
    for msg, (message_id, node) in zip(sent, [("m-bio", 7), ("m-legal", 9)]):
        msg.metadata.message_id, msg.metadata.dst_node_id = message_id, node
    strategy.policy.sent = sent
    ok = reply({"encoder.w": torch.ones(2), "heads.bio.weight": torch.ones(1)}, 5, "bio", 7)
    ok.metadata.reply_to_message_id = "m-bio"
    lost = FakeReply(None, 1, FakeError("Error: Node Unavailable - no heartbeat", lost_code))
    lost.metadata.reply_to_message_id = "m-legal"
    return ok, lost


def test_a_node_the_superlink_reports_lost_is_named_by_the_message_it_did_not_answer() -> None:
    strategy = strategy_with_global("fedavg", toy_global(), 2)
    ok, lost = bio_answers_legal_is_lost(strategy)

    with pytest.raises(RoundFailed, match="node 9: Error: Node Unavailable.*on-node-loss=continue would finish"):
        strategy.aggregate_train(1, [ok, lost])
    with pytest.raises(RoundFailed, match=r"1 replies for 2 clients after the reply timeout of 3600 s: no reply from node 9 \(on-node-loss=continue"):
        strategy.aggregate_train(1, [ok])
    with pytest.raises(RoundFailed, match=r"roll call: 1 replies for 2 clients after 7200 s \(the roll call's wait: clients start\): no reply from node 9"):
        strategy.policy.usable(1, "roll call", [ok], waited=7200.0)


@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
@pytest.mark.parametrize("how", ["superlink-error", "no-reply"])
def test_in_continue_mode_a_lost_node_is_dropped_recorded_and_no_longer_waited_for(name: str, how: str) -> None:
    strategy = strategy_with_global(name, toy_global(), 2, continue_on_loss=True)
    ok, lost = bio_answers_legal_is_lost(strategy)

    arrays, _ = strategy.aggregate_train(3, [ok, lost] if how == "superlink-error" else [ok])
    merged = arrays.to_torch_state_dict()

    assert torch.equal(merged["encoder.w"], torch.ones(2)) and torch.equal(merged["heads.bio.weight"], torch.ones(1))
    assert torch.equal(merged["heads.legal.weight"], torch.zeros(1))  # the lost domain's head is left as it was
    (entry,) = strategy.client_history[0]["lost"]
    assert strategy.client_history[0]["round"] == 3 and entry["node"] == "node 9" and entry["stage"] == "train"
    assert ("Node Unavailable" if how == "superlink-error" else "no reply") in entry["reason"]
    strategy.follow_policy()
    assert (strategy.min_available_nodes, strategy.min_train_nodes) == (1, 1)
    assert wait_for_nodes(FakeGrid([7]), strategy.min_available_nodes, 0.1, "round 4", strategy.policy.node_names) == [7]
    assert strategy.policy.reachable(FakeGrid([7, 9])).get_node_ids() == [7]  # a simulation still lists it: never drawn again


def test_in_continue_mode_a_client_that_raised_still_fails_the_run() -> None:
    strategy = strategy_with_global("fedavg", toy_global(), 2, continue_on_loss=True)
    ok, broken = bio_answers_legal_is_lost(strategy, ErrorCode.CLIENT_APP_RAISED_EXCEPTION)

    with pytest.raises(RoundFailed, match="node 9: Error: Node Unavailable - no heartbeat$"):
        strategy.aggregate_train(1, [ok, broken])


def test_in_continue_mode_a_round_with_every_node_lost_fails() -> None:
    strategy = strategy_with_global("fedavg", toy_global(), 2, continue_on_loss=True)
    _, lost = bio_answers_legal_is_lost(strategy)

    with pytest.raises(RoundFailed, match="1 of 1 clients failed: node 9"):
        strategy.aggregate_train(1, [lost])


class FakeGrid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


def test_a_round_waiting_for_a_node_that_left_gives_up_after_the_reply_timeout_naming_it() -> None:
    strategy = RuleStrategy(rule("fedavg"), RoundSettings(2, reply_timeout=0.5))
    strategy.policy.node_names = {7: "node 7 (bio-0)", 9: "node 9 (legal-0)"}

    with pytest.raises(RoundFailed, match=r"round 2: 1 of 2 nodes connected after 0 s; lost: node 9 \(legal-0\)"):
        strategy.configure_train(2, ArrayRecord(toy_global()), ConfigRecord(), FakeGrid([7]))


@pytest.mark.parametrize(
    "reason",
    [
        "<class 'flwr.clientapp.client_app.ClientAppException'>:<'\nException ConfigError occurred. Message: bad 'x''>",
        "<class 'fl.run.config.ConfigError'>:<'bad 'x''>",
    ],
)
def test_error_text_is_the_clients_own_message_in_simulation_and_on_a_supernode(reason: str) -> None:
    assert error_text(reason) == "bad 'x'"


def test_client_evaluations_are_averaged_within_each_domain() -> None:
    def evaluation(domain: str, accuracy: float, examples: int) -> RecordDict:
        return RecordDict(
            {
                "metrics": MetricRecord({"eval-accuracy": accuracy, "num-examples": examples}),
                "client": ConfigRecord({"domain": domain, "partition-id": 0}),
            }
        )

    merged = per_domain_metrics([evaluation("bio", 1.0, 10), evaluation("bio", 0.5, 30), evaluation("legal", 0.2, 5)], "num-examples")

    assert merged["bio-eval-accuracy"] == pytest.approx(0.625)
    assert merged["legal-eval-accuracy"] == pytest.approx(0.2)
    assert (merged["bio-num-examples"], merged["bio-clients"], merged["legal-clients"]) == (40, 2, 1)


def test_a_nan_update_is_refused_before_averaging() -> None:
    strategy = strategy_with_global("fedavg", toy_global(), 1)

    with pytest.raises(UpdateError, match="encoder.w"):
        strategy.aggregate_train(1, [reply({"encoder.w": torch.tensor([1.0, float("nan")])}, 5, "bio", 1)])


@pytest.mark.parametrize(("examples", "expected"), [(0, "expected a number > 0"), (5000, "expected at most 640")])
def test_a_num_examples_no_round_allows_is_refused_naming_the_client(examples: int, expected: str) -> None:
    strategy = strategy_with_global("fedavg", toy_global(), 2, max_examples=640)
    honest = reply({"encoder.w": torch.ones(2)}, 640, "bio", 1)

    with pytest.raises(UpdateError, match=rf"node 2 \(legal-0\): num-examples {examples}: {expected}"):
        strategy.aggregate_train(1, [honest, reply({"encoder.w": torch.ones(2)}, examples, "legal", 2)])


def test_aligned_equals_fedavg_when_clients_are_small_updates_of_the_global_model() -> None:
    torch.manual_seed(0)
    encoder = AutoModel.from_config(tiny_bert_config(vocab_size=100))
    base = {f"encoder.{k}": v for k, v in encoder.state_dict().items() if v.is_floating_point()}
    base.update({"heads.bio.weight": torch.randn(3, 32), "heads.legal.weight": torch.randn(2, 32)})
    clients = []
    for i, domain in enumerate(["bio", "legal"]):
        state = {k: v + 1e-3 * torch.randn_like(v) for k, v in base.items() if not k.startswith("heads.") or domain in k}
        clients.append((state, 10 * (i + 1), domain, i + 1))

    fedavg, _ = strategy_with_global("fedavg", base, 2).aggregate_train(1, [reply(*c) for c in clients])
    aligned_strategy = strategy_with_global("aligned", base, 2)
    aligned, _ = aligned_strategy.aggregate_train(1, [reply(*c) for c in clients])

    expected, got = fedavg.to_torch_state_dict(), aligned.to_torch_state_dict()
    assert all(torch.allclose(expected[k], got[k], atol=1e-6) for k in expected)
    assert [c["moved-units"] for c in aligned_strategy.client_history[0]["clients"]] == [0, 0]  # kept in results.json


@pytest.mark.parametrize(("text", "needle"), [("fedavg,fedsgd", "unknown fedsgd"), ("fedavg,ties,fedavg", "fedavg listed more than once"), (",", "none given")])
def test_a_bad_strategy_list_names_the_value(text: str, needle: str) -> None:
    with pytest.raises(OptionError, match=needle):
        parse_names(text)


@pytest.mark.parametrize(
    ("fisher", "needle"),
    [
        ({"encoder.w": torch.tensor([1.0, float("nan")])}, "Fisher for 'encoder.w' has non-finite values"),
        ({"encoder.w": torch.tensor([1.0, -1.0])}, "Fisher for 'encoder.w' has negative values"),
        ({"encoder.w": torch.ones(3)}, r"Fisher for 'encoder.w' has shape \(3,\), expected \(2,\)"),
    ],
)
def test_a_bad_client_statistic_fails_the_round_in_one_line_naming_the_node(fisher: dict[str, torch.Tensor], needle: str) -> None:
    strategy = strategy_with_global("fisher", toy_global(), 2)
    good = reply({"encoder.w": torch.ones(2)}, 5, "bio", 1, fisher={"encoder.w": torch.ones(2)})
    bad = reply({"encoder.w": torch.ones(2)}, 5, "legal", 2, fisher=fisher)

    with pytest.raises(UpdateError, match=rf"^node 2 \(legal-0\): {needle}") as error:
        strategy.aggregate_train(1, [good, bad])
    assert "\n" not in str(error.value)


def test_a_rule_with_a_statistic_merges_with_it_and_records_the_bytes_each_client_sent() -> None:
    strategy = strategy_with_global("fisher", toy_global(), 2)
    replies = [
        reply({"encoder.w": torch.tensor([1.0, 1.0])}, 5, "bio", 1, fisher={"encoder.w": torch.tensor([3.0, 1.0])}),
        reply({"encoder.w": torch.tensor([5.0, 5.0])}, 5, "legal", 2, fisher={"encoder.w": torch.tensor([1.0, 1.0])}),
    ]

    arrays, _ = strategy.aggregate_train(1, replies)

    assert torch.allclose(arrays.to_torch_state_dict()["encoder.w"], torch.tensor([2.0, 3.0]))  # (3*1 + 1*5) / 4, (1 + 5) / 2
    sent = [c["bytes-sent"] for c in strategy.client_history[0]["clients"]]
    assert [set(s) for s in sent] == [{"arrays", "fisher"}] * 2
    assert all(s["arrays"] >= 8 and s["fisher"] >= 8 for s in sent)  # at least the 2 float32 values of each record


def test_replies_are_merged_in_the_order_of_their_clients_not_of_arrival() -> None:
    def replies() -> tuple[Message, Message]:  # fresh each time: a merged reply's arrays are dropped
        return reply({"encoder.w": torch.tensor([0.1, 0.2])}, 3, "bio", 1), reply({"encoder.w": torch.tensor([0.3, 0.7])}, 7, "legal", 2)

    a, b = replies()
    first, _ = strategy_with_global("ties", toy_global(), 2).aggregate_train(1, [a, b])
    a, b = replies()
    second, _ = strategy_with_global("ties", toy_global(), 2).aggregate_train(1, [b, a])

    assert torch.equal(first.to_torch_state_dict()["encoder.w"], second.to_torch_state_dict()["encoder.w"])
    assert all(len(m.content["arrays"]) == 0 for m in (a, b))  # Flower's loop keeps the replies a round longer


def test_the_train_config_tells_clients_what_the_rule_needs() -> None:
    strategy = RuleStrategy(rule("regmean", **{"regmean-batches": 3}), RoundSettings(1))
    strategy._construct_messages = lambda record, nodes, kind: [record]  # Flower's Messages need a running app
    strategy.policy.node_roles = {7: "bio-0"}  # answered the roll call
    config = ConfigRecord({"local-steps": 2})

    (record,) = strategy.configure_train(1, ArrayRecord(toy_global()), config, FakeGrid([7]))

    sent = record["config"]
    assert (sent["statistic"], sent["statistic-batches"], sent["local-steps"]) == ("gram", 3, 2)


def test_a_client_sending_another_domains_head_is_refused_naming_the_node() -> None:
    strategy = strategy_with_global("fedavg", toy_global(), 2)
    honest = reply({"encoder.w": torch.ones(2), "heads.legal.weight": torch.ones(1)}, 5, "legal", 2)
    hostile = reply({"encoder.w": torch.ones(2), "heads.legal.weight": torch.full((1,), 9.0)}, 5, "bio", 1)

    with pytest.raises(UpdateError, match=r"node 1 \(bio-0\): a 'bio' client sent another domain's head \(heads.legal.weight\)"):
        strategy.aggregate_train(1, [honest, hostile])


def test_a_reply_without_a_key_it_trains_is_refused_naming_the_key_and_the_node() -> None:
    strategy = strategy_with_global("fedavg", toy_global(), 2)
    honest = reply({"encoder.w": torch.ones(2), "heads.legal.weight": torch.ones(1)}, 5, "legal", 2)
    headless = reply({"encoder.w": torch.ones(2)}, 5, "bio", 1, own_head=False)

    with pytest.raises(UpdateError, match=r"node 1 \(bio-0\): the reply lacks key 'heads.bio.weight': expected the encoder and the 'bio' head"):
        strategy.aggregate_train(1, [honest, headless])


def test_a_float16_key_is_refused_so_the_global_model_keeps_its_dtype() -> None:
    strategy = strategy_with_global("fedavg", toy_global(), 2)
    honest = reply({"encoder.w": torch.ones(2), "heads.legal.weight": torch.ones(1)}, 5, "legal", 2)
    half = reply({"encoder.w": torch.ones(2).half(), "heads.bio.weight": torch.ones(1)}, 5, "bio", 1)

    with pytest.raises(UpdateError, match=r"node 1 \(bio-0\): key 'encoder.w' has dtype torch.float16, expected torch.float32"):
        strategy.aggregate_train(1, [honest, half])


@pytest.mark.parametrize(
    ("metrics", "needle"),
    [
        ({"train-loss": 1.0, "num-examples": "32"}, "metric 'num-examples' is '32' \\(str\\): expected an integer"),
        ({"train-loss": 1.0, "num-examples": 32.0}, "metric 'num-examples' is 32.0 \\(float\\): expected an integer"),
        ({"train-loss": True, "num-examples": 32}, "metric 'train-loss' is True \\(bool\\): expected a real number"),
        ({"train-loss": "low", "num-examples": 32}, "metric 'train-loss' is 'low' \\(str\\): expected a real number"),
    ],
)
def test_a_train_metric_of_the_wrong_type_is_refused_naming_the_node(metrics: dict[str, object], needle: str) -> None:
    strategy = strategy_with_global("fedavg", toy_global(), 1)
    bad = reply({"encoder.w": torch.ones(2), "heads.bio.weight": torch.ones(1)}, 5, "bio", 3)
    bad.content["metrics"] = ConfigRecord(metrics)  # a patched client: a MetricRecord refuses strings, a ConfigRecord does not

    with pytest.raises(UpdateError, match=rf"node 3 \(bio-0\): {needle}"):
        strategy.aggregate_train(1, [bad])


def test_an_evaluation_metric_of_the_wrong_type_is_refused_naming_the_node() -> None:
    strategy = RuleStrategy(rule("fedavg"), RoundSettings(1, client_eval=True, max_eval_examples=100))
    strategy.policy.sent = [FakeReply(None, 0)]
    metrics = ConfigRecord({"eval-accuracy": "0.9", "eval-loss": 0.3, "num-examples": 10})
    bad = FakeReply(RecordDict({"metrics": metrics, "client": ConfigRecord({"domain": "bio", "partition-id": 0})}), 4)

    with pytest.raises(UpdateError, match=r"node 4 \(bio-0\): metric 'eval-accuracy' is '0.9' \(str\): expected a real number"):
        strategy.aggregate_evaluate(1, [bad])


def test_a_node_that_changes_its_claimed_domain_is_refused() -> None:
    strategy = strategy_with_global("fedavg", toy_global(), 1)
    strategy.aggregate_train(1, [reply({"encoder.w": torch.ones(2), "heads.bio.weight": torch.ones(1)}, 5, "bio", 1)])

    with pytest.raises(UpdateError, match="node 1: claims to be legal-0, but served bio-0 in an earlier reply"):
        strategy.aggregate_train(2, [reply({"encoder.w": torch.ones(2), "heads.legal.weight": torch.ones(1)}, 5, "legal", 1)])


def test_a_reply_of_finite_values_large_enough_to_overflow_the_sum_is_refused_naming_the_node() -> None:
    strategy = strategy_with_global("fedavg", toy_global(), 5, max_examples=160)
    replies = [reply({"encoder.w": torch.ones(2)}, 160, "bio", node) for node in range(1, 5)]
    replies.append(reply({"encoder.w": torch.full((2,), 1e36)}, 160, "legal", 5))

    with pytest.raises(UpdateError, match=r"node 5 \(legal-0\): key 'encoder.w' holds values up to 1e\+36: expected at most 4.25e\+35"):
        strategy.aggregate_train(1, replies)


def test_a_merge_that_is_not_finite_is_refused_naming_the_largest_sender() -> None:
    from strategies.flower.strategy import check_merged
    from strategies.update import ClientUpdate

    updates = [ClientUpdate("node 1 (bio-0)", "bio-0", {"w": torch.ones(2)}, 1.0), ClientUpdate("node 2 (legal-0)", "legal-0", {"w": torch.full((2,), 3e38)}, 1.0)]

    with pytest.raises(UpdateError, match=r"round 3: merged 'w' is not finite: node 2 \(legal-0\) sent values up to 3e\+38"):
        check_merged(3, {"w": torch.tensor([1.0, float("inf")])}, updates)


@pytest.mark.parametrize(
    ("metrics", "needle"),
    [
        ({"eval-accuracy": 7.5, "eval-loss": 0.3, "num-examples": 10}, "eval-accuracy 7.5: expected a finite number in \\[0, 1\\]"),
        ({"eval-accuracy": 0.5, "eval-loss": float("nan"), "num-examples": 10}, "eval-loss nan"),
        ({"eval-accuracy": 0.5, "eval-loss": 0.3, "num-examples": 10**9}, "num-examples 1e\\+09: expected a finite number in \\[1, 100\\]"),
        ({"eval-loss": 0.3, "num-examples": 10}, "has no 'eval-accuracy'"),
    ],
)
def test_a_bad_client_evaluation_is_refused_naming_the_node(metrics: dict[str, float], needle: str) -> None:
    strategy = RuleStrategy(rule("fedavg"), RoundSettings(1, client_eval=True, max_eval_examples=100))
    strategy.policy.sent = [FakeReply(None, 0)]
    bad = FakeReply(RecordDict({"metrics": MetricRecord(metrics), "client": ConfigRecord({"domain": "bio", "partition-id": 0})}), 4)

    with pytest.raises(UpdateError, match=rf"node 4 \(bio-0\): .*{needle}"):
        strategy.aggregate_evaluate(1, [bad])


def test_a_resumed_strategy_numbers_rounds_as_the_uninterrupted_run_and_keeps_its_history() -> None:
    strategy = strategy_with_global("fedavg", toy_global(), 1)
    strategy.aggregate_train(1, [reply({"encoder.w": torch.ones(2), "heads.bio.weight": torch.ones(1)}, 5, "bio", 1)])
    saved = strategy.state()

    resumed = strategy_with_global("fedavg", toy_global(), 1)
    resumed.restore(saved, completed_round=1)
    resumed.aggregate_train(1, [reply({"encoder.w": torch.ones(2), "heads.bio.weight": torch.ones(1)}, 5, "bio", 1)])

    assert [entry["round"] for entry in resumed.client_history] == [1, 2]
