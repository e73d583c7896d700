"""Simulated attackers: specs refused at the boundary, attackers drawn by seed, the poisoning math, and one Flower
simulation in which a boosted update moves the global model as far as the boost says."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fl.federation.client import ClientRole, client_data, training_set
from fl.federation.rounds import CentralEvaluator, StrategyJob
from fl.federation.simulation import run_strategy
from fl.modeling.attacks import AttackSpec, derangement, flipped_labels, parse_attack, poison
from fl.run.cli import build_config, run_options
from fl.run.config import ConfigError, RunConfig
from fl.run.domains import load_domains
from fl.studies.baselines import FEDAVG, fit_base, make_workbench
from tests.conftest import tiny_run_config


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("bogus:1", "unknown kind 'bogus'"),
        ("scale:1", "expected scale:F:COUNT"),
        ("scale:2:1:1", "expected scale:F:COUNT"),
        ("sign-flip", "expected sign-flip[:F]:COUNT"),
        ("noise:0.1", "expected noise:SIGMA:COUNT"),
        ("label-flip:2:1", "expected label-flip:COUNT"),
        ("scale:x:1", "COUNT an integer"),
        ("label-flip:one", "COUNT an integer"),
        ("scale:0:1", "finite F > 0"),
        ("scale:-3:1", "finite F > 0"),
        ("scale:nan:1", "finite F > 0"),
        ("sign-flip:inf:1", "finite F > 0"),
        ("noise:-0.1:1", "finite SIGMA >= 0"),
        ("label-flip:0", "COUNT from 1 to 3"),
        ("scale:2:4", "at least one of the 4 clients must stay honest"),
    ],
)
def test_a_bad_attack_is_refused_with_one_line_naming_it(spec: str, expected: str) -> None:
    config = RunConfig(clients_per_domain=2, attack=spec)

    with pytest.raises(ConfigError) as refused:
        config.validate()

    message = str(refused.value)
    assert message.startswith(f"--attack {spec}: ") and expected in message and "\n" not in message


def test_the_cli_flag_reaches_the_config_and_is_checked_there() -> None:
    parser = run_options("test")

    assert build_config(parser.parse_args(["--attack", "sign-flip:2:1"])).attack == "sign-flip:2:1"
    with pytest.raises(ConfigError, match="^--attack noise:-1:1: "):
        build_config(parser.parse_args(["--attack", "noise:-1:1"]))


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("", None),
        ("scale:10:1", AttackSpec("scale", 1, 10.0)),
        ("sign-flip:3", AttackSpec("sign-flip", 3, 1.0)),
        ("sign-flip:0.5:2", AttackSpec("sign-flip", 2, 0.5)),
        ("noise:0:1", AttackSpec("noise", 1, 0.0)),
        ("label-flip:3", AttackSpec("label-flip", 3)),
    ],
)
def test_good_attacks_parse(spec: str, parsed: AttackSpec | None) -> None:
    assert RunConfig(clients_per_domain=2, attack=spec).validate().attack == spec
    assert parse_attack(spec, num_clients=4) == parsed


def test_attackers_are_count_distinct_clients_fixed_by_the_seed() -> None:
    config = RunConfig(clients_per_domain=3, attack="scale:5:2")

    chosen = config.attackers()
    by_seed = {tuple(replace(config, seed=s).attackers()) for s in range(10)}

    assert len(set(chosen)) == 2 and chosen == sorted(chosen)
    assert set(chosen) <= {f"{d}-{p}" for d in ("bio", "legal") for p in range(3)}
    assert config.attackers() == chosen
    assert len(by_seed) > 1
    assert RunConfig().attackers() == []


def toy_states() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    received = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5]), "ids": torch.tensor([0, 1, 2])}
    trained = {"w": torch.tensor([1.5, 1.0]), "b": torch.tensor([0.75]), "ids": torch.tensor([0, 1, 2])}
    return received, trained


@pytest.mark.parametrize(
    ("spec", "w", "b"),
    [
        (AttackSpec("scale", 1, 10.0), [6.0, -8.0], [3.0]),  # global + 10 * delta
        (AttackSpec("sign-flip", 1), [0.5, 3.0], [0.25]),  # global - delta
        (AttackSpec("sign-flip", 1, 2.0), [0.0, 4.0], [0.0]),  # global - 2 * delta
        (AttackSpec("label-flip", 1), [1.5, 1.0], [0.75]),  # its harm is in training: it sends what it trained
    ],
)
def test_poison_moves_floating_weights_as_the_spec_says(spec: AttackSpec, w: list[float], b: list[float]) -> None:
    received, trained = toy_states()

    sent = poison(spec, received, trained, seed=0)

    assert torch.equal(sent["w"], torch.tensor(w)) and torch.equal(sent["b"], torch.tensor(b))
    assert torch.equal(sent["ids"], trained["ids"])


def test_noise_is_seeded_and_spares_integer_tensors() -> None:
    received, trained = toy_states()
    spec = AttackSpec("noise", 1, 0.5)

    first = poison(spec, received, trained, seed=3)
    again = poison(spec, received, trained, seed=3)
    other = poison(spec, received, trained, seed=4)

    assert all(torch.equal(first[k], again[k]) for k in trained)
    assert not torch.equal(first["w"], other["w"])
    assert not torch.equal(first["w"], trained["w"])
    assert torch.equal(first["ids"], trained["ids"])
    big = poison(AttackSpec("noise", 1, 2.0), {"w": torch.zeros(20000)}, {"w": torch.zeros(20000)}, seed=0)["w"]
    assert abs(big.std().item() - 2.0) < 0.05


@pytest.mark.parametrize("num_labels", [2, 3, 4, 5])
def test_flipped_labels_move_every_label_the_same_way_each_time(num_labels: int) -> None:
    labels = torch.arange(num_labels).repeat(3)

    flipped = flipped_labels(labels, num_labels, seed=7)

    assert not (flipped == labels).any()
    assert sorted(derangement(num_labels, 7).tolist()) == list(range(num_labels))
    assert torch.equal(flipped, flipped_labels(labels, num_labels, seed=7))
    assert torch.equal(flipped[:num_labels].repeat(3), flipped)


@pytest.fixture(scope="module")
def tiny_attack_run(tiny_model_dir: Path, toy_csvs: tuple[Path, Path]):
    config = tiny_run_config(tiny_model_dir, toy_csvs, rounds=1, attack="scale:100:1")
    workbench = make_workbench(config, str(tiny_model_dir), load_domains(config))
    start, base_scores = fit_base(workbench)
    return config, workbench, start, base_scores


def test_a_label_flipper_trains_on_deranged_labels_and_an_honest_client_on_its_own(tiny_attack_run) -> None:
    config = replace(tiny_attack_run[0], attack="label-flip:1")
    (attacker,) = config.attackers()
    honest = "bio-0" if attacker == "legal-0" else "legal-0"

    def labels_of(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        role = ClientRole(name.split("-")[0], 0, 1)
        return training_set(config, role).labels, client_data(config, role)[0].labels

    flipped, own = labels_of(attacker)
    kept, honest_own = labels_of(honest)

    assert not (flipped == own).any()
    assert torch.equal(kept, honest_own)


def test_a_boosted_update_under_fedavg_moves_its_head_a_hundred_times_farther(tiny_attack_run) -> None:
    config, workbench, start, base_scores = tiny_attack_run
    (attacker,) = config.attackers()
    honest = "bio" if attacker == "legal-0" else "legal"
    evaluator = CentralEvaluator(workbench.model, workbench.test_sets, "fedavg", initial_scores=base_scores)

    outcome = run_strategy(StrategyJob(config, FEDAVG, start, evaluator))

    def moved(domain: str) -> float:  # a head is sent, and averaged, by its own domain's client only
        key = f"heads.{domain}.weight"
        return (outcome.final_state[key] - start[key]).norm().item()

    ratio = moved(attacker.split("-")[0]) / moved(honest)
    assert 10 < ratio < 1000  # Adam moves both heads by about lr per weight and step; the attacker boosts its own 100x
    (clients,) = [h["clients"] for h in outcome.client_history]
    assert len({frozenset(c) for c in clients}) == 1  # the replies carry the same fields: nothing marks the attacker
