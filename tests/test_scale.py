"""Cross-device scale: K of N clients per round, replies not kept after their merge, one data cache per domain."""

import gc
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from flwr.app import Array, ArrayRecord, MetricRecord

from fl.federation.client import ClientRole, client_data, encoded_domain
from fl.federation.rounds import CentralEvaluator, StrategyJob
from fl.federation.simulation import run_strategy
from fl.run.domains import load_domains
from fl.studies.baselines import fit_base, make_workbench
from strategies.flower.sampling import client_order, sample_clients
from strategies.flower.streaming import ReplyStream
from strategies.rules import settings
from tests.conftest import tiny_run_config

NAMES = {node: f"{domain}-{part}" for node, (domain, part) in enumerate((d, p) for d in ("bio", "legal") for p in range(10))}


def test_k_of_n_clients_are_drawn_reproducibly_with_every_domain_represented() -> None:
    for server_round in range(1, 30):
        chosen = sample_clients(NAMES, 3, seed=4, server_round=server_round)
        assert chosen == sample_clients(dict(reversed(NAMES.items())), 3, seed=4, server_round=server_round)
        assert len(set(chosen)) == 3
        assert {NAMES[n].split("-")[0] for n in chosen} == {"bio", "legal"}
    draws = {tuple(sample_clients(NAMES, 3, seed=4, server_round=r)) for r in range(1, 30)}
    assert len(draws) > 10  # rounds differ
    assert sample_clients(NAMES, 3, 4, 1) != sample_clients(NAMES, 3, 5, 1) or sample_clients(NAMES, 3, 4, 2) != sample_clients(NAMES, 3, 5, 2)
    assert sample_clients(NAMES, 1, 0, 1)[0] in NAMES  # K below the domains: any one client
    assert sample_clients(NAMES, 20, 0, 1) == sorted(NAMES, key=lambda n: client_order(NAMES[n]))


def test_a_fraction_of_the_clients_is_rounded_and_never_zero(tiny_model_dir: Path, toy_csvs: tuple[Path, Path]) -> None:
    config = tiny_run_config(tiny_model_dir, toy_csvs, clients_per_domain=10)
    assert replace(config, clients_per_round="0.25").sampled_clients == 5
    assert replace(config, clients_per_round="0.01").sampled_clients == 1
    assert replace(config, clients_per_round="7").sampled_clients == 7
    assert config.sampled_clients == 20


def test_clients_of_one_domain_share_one_tokenised_copy_of_it(tiny_model_dir: Path, toy_csvs: tuple[Path, Path]) -> None:
    config = tiny_run_config(tiny_model_dir, toy_csvs, clients_per_domain=3, seed=11)
    encoded_domain.cache_clear()
    parts = [client_data(config, ClientRole("bio", p, 3))[0] for p in range(3)]
    assert encoded_domain.cache_info().misses == 1 and encoded_domain.cache_info().hits == 2
    assert sum(len(p) for p in parts) == config.train_size
    assert len({ids for p in parts for ids in p.input_ids}) >= config.train_size // 2  # partitions, not copies


class LiveArrays(CentralEvaluator):
    """Scores as usual and records the bytes of every flwr Array the driver still references after each round."""

    live: dict[int, int]

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        gc.collect()
        self.live = getattr(self, "live", {})
        self.live[server_round] = sum(len(o.data) for o in gc.get_objects() if isinstance(o, Array))
        return super().__call__(server_round, arrays)


@pytest.fixture(scope="module")
def twelve_clients(tiny_model_dir: Path, toy_csvs: tuple[Path, Path]):
    config = tiny_run_config(tiny_model_dir, toy_csvs, clients_per_domain=6, local_steps=1)
    workbench = make_workbench(config, str(tiny_model_dir), load_domains(config))
    start, base_scores = fit_base(workbench)
    model_bytes = sum(t.numel() * t.element_size() for t in start.values())
    return config, workbench, start, base_scores, model_bytes


@pytest.mark.parametrize(("rule", "per_round"), [("fedavg", "6"), ("median", "all")])
def test_k_clients_train_as_drawn_and_the_driver_keeps_no_reply_after_its_round(twelve_clients, rule: str, per_round: str) -> None:
    """12 clients: holding a round's replies would be 6 (or 12) model copies; the global model and the message that
    last carried it are 2-3. FedAvg merges each reply as it arrives; the median holds the round's, then drops them."""
    config, workbench, start, base_scores, model_bytes = twelve_clients
    config = replace(config, clients_per_round=per_round)
    evaluator = LiveArrays(workbench.model, workbench.test_sets, rule, initial_scores=base_scores)

    outcome = run_strategy(StrategyJob(config, settings([rule], {})[0], start, evaluator))

    assert sorted(evaluator.live) == [0, 1, 2]  # the server still scores every round
    assert max(evaluator.live[r] for r in (1, 2)) <= 4 * model_bytes, {r: b / model_bytes for r, b in evaluator.live.items()}
    names = {i: f"{d}-{p}" for i, (d, p) in enumerate((d, p) for d in config.domains for p in range(config.clients_per_domain))}
    for entry in outcome.client_history:
        trained = sorted(c["client"].split("(")[1].rstrip(")") for c in entry["clients"])
        if per_round == "all":
            assert len(trained) == 12 and "sampled" not in entry
            continue
        drawn = [names[n] for n in sample_clients(names, 6, config.seed, int(entry["round"]))]
        assert entry["sampled"] == drawn and trained == sorted(drawn)
        assert {name.split("-")[0] for name in drawn} == {"bio", "legal"}


class QueueGrid:
    """A grid whose nodes answer one pushed message per pull, in push order; it records the most in flight."""

    pull_interval = 0.0

    def __init__(self) -> None:
        self.pending: list[str] = []
        self.pushed = 0
        self.most_in_flight = 0

    def push_messages(self, messages: list[object]) -> list[str]:
        ids = [f"m{self.pushed + i}" for i in range(len(messages))]
        self.pushed += len(messages)
        self.pending.extend(ids)
        self.most_in_flight = max(self.most_in_flight, len(self.pending))
        return ids

    def pull_messages(self, ids: set[str]) -> list[SimpleNamespace]:
        if not self.pending:
            return []
        answered = self.pending.pop(0)
        assert answered in ids
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=answered))]


def test_a_simulation_keeps_at_most_its_window_of_messages_in_flight_and_gets_every_reply() -> None:
    grid = QueueGrid()
    seen: list[str] = []
    stream = ReplyStream(grid, lambda reply: seen.append(reply.metadata.reply_to_message_id) or reply, window=4)  # type: ignore[arg-type]

    replies = stream.send_and_receive([object() for _ in range(10)], timeout=10)  # type: ignore[misc]

    assert len(replies) == 10 and sorted(seen) == sorted(f"m{i}" for i in range(10))
    assert grid.most_in_flight == 4
