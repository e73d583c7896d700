"""Task arithmetic, TIES, DARE and DARE-TIES against hand computations, per key and head-aware."""

import pytest
import torch

from strategies.aggregation import weighted_mean
from strategies.task_vectors import dare, dare_ties, task_arithmetic, ties, trim_threshold
from strategies.update import ClientUpdate, MergeContext

GLOBAL = {"encoder.w": torch.ones(5), "ids": torch.arange(3)}
DELTAS = [
    torch.tensor([4.0, -1.0, 0.5, -3.0, 2.0]),
    torch.tensor([-2.0, -5.0, 1.0, 3.0, -1.0]),
    torch.tensor([1.0, 2.0, -4.0, 1.0, 3.0]),
]


def clients(deltas=DELTAS, weights=(1.0, 1.0, 1.0)) -> list[ClientUpdate]:
    return [
        ClientUpdate(f"node {i}", f"c{i}", {"encoder.w": GLOBAL["encoder.w"] + d, "ids": torch.arange(3)}, w)
        for i, (d, w) in enumerate(zip(deltas, weights))
    ]


def test_task_arithmetic_scales_the_weighted_mean_delta_and_is_fedavg_exactly_at_lambda_1() -> None:
    updates = clients(weights=(1.0, 2.0, 1.0))
    mean_delta = (DELTAS[0] + 2 * DELTAS[1] + DELTAS[2]) / 4

    half = task_arithmetic(GLOBAL, updates, MergeContext(), lambda_=0.5)
    one = task_arithmetic(GLOBAL, updates, MergeContext(), lambda_=1.0)
    fedavg = weighted_mean((u.state, u.weight) for u in updates)

    assert torch.allclose(half["encoder.w"], 1 + 0.5 * mean_delta)
    assert torch.equal(one["encoder.w"], fedavg["encoder.w"])
    assert torch.equal(one["ids"], torch.arange(3))


def test_ties_trims_elects_and_takes_the_disjoint_mean_coordinate_by_coordinate() -> None:
    # density 0.6 keeps 3 of 5 entries per client:
    #   c0 [4, 0, 0, -3, 2]   c1 [-2, -5, 0, 3, 0]   c2 [0, 2, -4, 0, 3]
    # summed mass [2, -3, -4, 0, 5] -> elected signs [+, -, -, none, +]
    # agreeing values: [4], [-5], [-4], none, [2, 3] -> disjoint mean [4, -5, -4, 0, 2.5]
    merged = ties(GLOBAL, clients(), MergeContext(), density=0.6, lambda_=1.0)

    assert torch.equal(merged["encoder.w"], 1 + torch.tensor([4.0, -5.0, -4.0, 0.0, 2.5]))
    assert torch.equal(merged["ids"], torch.arange(3))


def test_ties_weights_the_sign_election_and_the_mean_by_examples_and_scales_by_lambda() -> None:
    # weights [1, 3, 1]: mass [4 - 6, -15 + 2, -4, -3 + 9, 2 + 3] = [-2, -13, -4, 6, 5]
    # agreeing: [-2 (c1)], [-5 (c1)], [-4 (c2)], [3 (c1)], [2 (c0, w 1), 3 (c2, w 1)] -> [-2, -5, -4, 3, 2.5]
    merged = ties(GLOBAL, clients(weights=(1.0, 3.0, 1.0)), MergeContext(), density=0.6, lambda_=2.0)

    assert torch.allclose(merged["encoder.w"], 1 + 2.0 * torch.tensor([-2.0, -5.0, -4.0, 3.0, 2.5]))


def test_ties_with_full_density_and_agreeing_clients_is_the_weighted_mean() -> None:
    deltas = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])]
    global_state = {"encoder.w": torch.zeros(2)}
    updates = [ClientUpdate(f"n{i}", f"c{i}", {"encoder.w": d}, w) for i, (d, w) in enumerate(zip(deltas, [1.0, 3.0]))]

    merged = ties(global_state, updates, MergeContext(), density=1.0, lambda_=1.0)

    assert torch.allclose(merged["encoder.w"], torch.tensor([2.5, 5.0]))


def test_trim_threshold_keeps_the_top_density_magnitudes() -> None:
    delta = torch.tensor([0.1, -5.0, 3.0, -0.2, 1.0, 0.0, 2.0, -4.0, 0.3, 0.05])

    assert trim_threshold(delta, 0.3) == 3.0  # keeps -5, -4, 3
    assert trim_threshold(delta, 0.25) == 3.0  # ceil(2.5) = 3 entries
    assert trim_threshold(delta, 1.0) == 0.0


def test_a_head_is_merged_only_over_the_clients_that_sent_it() -> None:
    global_state = {"encoder.w": torch.zeros(2), "heads.bio.weight": torch.zeros(2), "heads.legal.weight": torch.full((2,), 9.0)}
    bio = ClientUpdate("n0", "bio-0", {"encoder.w": torch.ones(2), "heads.bio.weight": torch.tensor([2.0, -2.0])}, 1.0)
    legal = ClientUpdate("n1", "legal-0", {"encoder.w": torch.full((2,), 3.0)}, 1.0)

    for merged in (
        ties(global_state, [bio, legal], MergeContext(), density=1.0, lambda_=1.0),
        dare(global_state, [bio, legal], MergeContext(), drop=0.0, lambda_=1.0),
        task_arithmetic(global_state, [bio, legal], MergeContext(), lambda_=1.0),
    ):
        assert torch.allclose(merged["heads.bio.weight"], torch.tensor([2.0, -2.0]))
        assert "heads.legal.weight" not in merged  # nobody sent it: the caller keeps the global value


def test_dare_without_dropping_is_task_arithmetic() -> None:
    updates = clients(weights=(1.0, 2.0, 5.0))

    dropped = dare(GLOBAL, updates, MergeContext(seed=3), drop=0.0, lambda_=0.7)
    plain = task_arithmetic(GLOBAL, updates, MergeContext(), lambda_=0.7)

    assert torch.allclose(dropped["encoder.w"], plain["encoder.w"], atol=1e-6)


def test_dare_is_unbiased_its_mean_over_seeds_is_within_three_standard_errors_of_the_undropped_merge() -> None:
    generator = torch.Generator().manual_seed(0)
    deltas = [torch.randn(12, generator=generator) for _ in range(3)]
    global_state = {"encoder.w": torch.ones(12)}
    updates = [ClientUpdate(f"n{i}", f"c{i}", {"encoder.w": 1 + d}, float(i + 1)) for i, d in enumerate(deltas)]
    expected = task_arithmetic(global_state, updates, MergeContext(), lambda_=1.0)["encoder.w"]

    draws = torch.stack([dare(global_state, updates, MergeContext(seed=s), drop=0.5, lambda_=1.0)["encoder.w"] for s in range(400)])
    standard_error = draws.std(dim=0) / 400**0.5

    assert bool(((draws.mean(dim=0) - expected).abs() <= 3 * standard_error).all())
    assert bool((draws.std(dim=0) > 0).all())  # it did drop


def test_dare_draws_depend_on_client_round_and_seed_not_on_the_order_of_replies() -> None:
    updates = clients()
    context = MergeContext(server_round=2, seed=5)

    forward = dare(GLOBAL, updates, context, drop=0.5, lambda_=1.0)
    backward = dare(GLOBAL, updates[::-1], context, drop=0.5, lambda_=1.0)
    other_round = dare(GLOBAL, updates, MergeContext(server_round=3, seed=5), drop=0.5, lambda_=1.0)

    assert torch.allclose(forward["encoder.w"], backward["encoder.w"], atol=1e-6)
    assert not torch.equal(forward["encoder.w"], other_round["encoder.w"])


def test_dare_ties_elects_signs_over_the_dropped_and_rescaled_deltas() -> None:
    context = MergeContext(seed=1)
    kept = [torch.rand(5, generator=context.generator(f"c{i}", "encoder.w")) >= 0.5 for i in range(3)]
    sparse = [d * k / 0.5 for d, k in zip(DELTAS, kept)]
    mass = sum(sparse)
    agree = [(s.sign() == mass.sign()) & (s != 0) for s in sparse]
    count = sum(a.float() for a in agree)
    expected = 1 + sum(s * a for s, a in zip(sparse, agree)) / count.clamp(min=1)

    merged = dare_ties(GLOBAL, clients(), context, drop=0.5, lambda_=1.0)

    assert torch.allclose(merged["encoder.w"], expected)


@pytest.mark.parametrize("rule", [ties, dare_ties])
def test_clients_disagreeing_on_an_integer_buffer_are_refused(rule) -> None:
    updates = clients()
    updates[2] = ClientUpdate("node 2", "c2", {"encoder.w": torch.ones(5), "ids": torch.tensor([0, 1, 7])}, 1.0)

    with pytest.raises(ValueError, match="node 2: integer tensor 'ids'"):
        rule(GLOBAL, updates, MergeContext(), **({"density": 0.5} if rule is ties else {"drop": 0.5}), lambda_=1.0)
