"""Task arithmetic, TIES, DARE and DARE-TIES against hand computations, per key and head-aware."""

import math

import numpy as np
import pytest
import torch

from strategies import task_vectors
from strategies.aggregation import weighted_mean
from strategies.task_vectors import dare, dare_ties, drop_mask, kth_largest, task_arithmetic, ties, trim, trim_threshold
from strategies.update import ClientUpdate, MergeContext

GLOBAL = {"encoder.w": torch.ones(5), "ids": torch.arange(3)}
DELTAS = [
    torch.tensor([4.0, -1.0, 0.5, -3.0, 2.0]),
    torch.tensor([-2.0, -5.0, 1.0, 3.0, -1.0]),
    torch.tensor([1.0, 2.0, -4.0, 1.0, 3.0]),
]


def generators(context: MergeContext, identity: str, key: str) -> tuple[np.random.Generator, np.random.Generator]:
    """DARE's two streams for a client and key: the bytes, and the edge uniforms 2**64 draws ahead."""
    edges = context.numpy_generator(identity, key)
    edges.bit_generator.advance(2**64)
    return context.numpy_generator(identity, key), edges


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
    kept = [torch.from_numpy(drop_mask(*generators(context, f"c{i}", "encoder.w"), 5, 0.5)) for i in range(3)]
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


def reference_ties(global_state, updates, density: float, lambda_: float) -> dict[str, torch.Tensor]:
    """TIES as written before the blocked version (whole tensors, masked_fill, two passes): the bit-exact reference."""
    merged = {}
    for key in [k for k, v in global_state.items() if v.is_floating_point()]:
        members = [u for u in updates if key in u.state]
        base = global_state[key].float()
        deltas = [u.state[key].float() - base for u in members]
        trimmed = [d.masked_fill(d.abs() < trim_threshold(d, density), 0.0) for d in deltas]
        mass = torch.zeros_like(base)
        for t, u in zip(trimmed, members):
            mass.add_(t, alpha=u.weight)
        elected = mass.sign_()
        total, counted = torch.zeros_like(base), torch.zeros_like(base)
        for t, u in zip(trimmed, members):
            agrees = (t.sign() == elected) & (t != 0)
            total.add_(t.masked_fill(~agrees, 0.0), alpha=u.weight)
            counted.add_(agrees.float(), alpha=u.weight)
        delta = total.div_(counted.clamp_(min=torch.finfo(torch.float32).tiny))
        merged[key] = base.clone().add_(delta, alpha=lambda_).to(global_state[key].dtype)
    return merged


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_merged_block_by_block_is_bit_identical_to_whole_tensor_ties(monkeypatch, dtype) -> None:
    monkeypatch.setattr(task_vectors, "BLOCK", 64)  # many blocks and a ragged last one
    generator = torch.Generator().manual_seed(7)
    global_state = {"encoder.w": torch.randn(37, 29, generator=generator).to(dtype), "encoder.b": torch.zeros(5).to(dtype)}
    global_state["encoder.b"][:2] = -0.0  # zeros keep their sign bit where nothing is merged
    updates = []
    for i, weight in enumerate([1.3, 0.7, 2.9, 1.0]):
        state = {k: (v.float() + 0.1 * torch.randn(v.shape, generator=generator)).to(dtype) for k, v in global_state.items()}
        state["encoder.w"].view(-1)[i::7] = global_state["encoder.w"].view(-1)[i::7]  # some zero deltas
        updates.append(ClientUpdate(f"n{i}", f"c{i}", state, weight))
    updates[3] = ClientUpdate("n3", "c3", {"encoder.w": updates[3].state["encoder.w"]}, 1.0)  # a key sent by some only

    for density in (0.05, 0.3, 1.0):
        merged = ties(global_state, updates, MergeContext(), density=density, lambda_=0.9)
        expected = reference_ties(global_state, updates, density, 0.9)
        for key, value in expected.items():
            assert merged[key].dtype == dtype
            assert torch.equal(merged[key], value) and torch.equal(merged[key].signbit(), value.signbit()), (key, density)


def test_kth_largest_selects_in_place_as_a_sort_would() -> None:
    magnitudes = np.abs(np.random.default_rng(0).standard_normal(10_001).astype(np.float32))
    magnitudes[:50] = 0.0
    magnitudes[50:60] = magnitudes[60]  # ties
    ordered = np.sort(magnitudes)[::-1]

    for keep in (1, 9, 10, 11, 5_000, 9_950, 10_000):
        assert kth_largest(magnitudes.copy(), keep) == ordered[keep - 1]
    assert kth_largest(magnitudes.copy(), 10_001) == 0.0


def test_trim_keeps_entries_at_the_threshold_and_zeroes_those_just_below() -> None:
    threshold = float(np.float32(0.7))
    below = float(np.nextafter(np.float32(threshold), np.float32(0)))
    delta = torch.tensor([threshold, -threshold, below, -below, 2.0, 0.0, -0.0])

    assert torch.equal(trim(threshold)(delta.clone()), torch.tensor([threshold, -threshold, 0.0, 0.0, 2.0, 0.0, 0.0]))
    assert trim(0.0)(delta.clone()).signbit()[-1]  # a threshold of 0 keeps everything as it is


@pytest.mark.parametrize("drop", [0.9, 0.5, 0.1, 1 / 3, 1 / 256, 0.999])
def test_drop_mask_drops_at_the_given_rate(drop: float) -> None:
    draws, edges = generators(MergeContext(seed=11), "c0", "encoder.w")
    count = 1 << 22

    kept = np.concatenate([drop_mask(draws, edges, task_vectors.BLOCK, drop) for _ in range(count // task_vectors.BLOCK)])

    dropped = float((kept == 0).mean())
    assert abs(dropped - drop) <= 4 * math.sqrt(drop * (1 - drop) / count)  # the byte cut alone would miss by up to 1/256
    assert kept.dtype == np.float32 and set(np.unique(kept).tolist()) == {0.0, 1.0}


def test_dare_masks_are_the_same_whatever_the_block_size_and_shared_by_dare_ties(monkeypatch) -> None:
    generator = torch.Generator().manual_seed(3)
    global_state = {"encoder.w": torch.zeros(1000)}
    updates = [ClientUpdate(f"n{i}", f"c{i}", {"encoder.w": torch.randn(1000, generator=generator)}, 1.0) for i in range(2)]
    context = MergeContext(server_round=4, seed=2)

    default = dare(global_state, updates, context, drop=0.7, lambda_=1.0)["encoder.w"]
    monkeypatch.setattr(task_vectors, "BLOCK", 64)
    small_blocks = dare(global_state, updates, context, drop=0.7, lambda_=1.0)["encoder.w"]
    single = dare_ties(global_state, updates[:1], context, drop=0.7, lambda_=1.0)["encoder.w"]

    assert torch.equal(default, small_blocks)
    assert torch.equal(single, dare(global_state, updates[:1], context, drop=0.7, lambda_=1.0)["encoder.w"])
    assert 0.6 < float((single == 0).float().mean()) < 0.8


def test_dare_is_the_weighted_mean_of_the_masked_and_rescaled_deltas() -> None:
    context = MergeContext(server_round=2, seed=9)
    weights = (1.0, 2.0, 5.0)
    kept = [torch.from_numpy(drop_mask(*generators(context, f"c{i}", "encoder.w"), 5, 0.4)) for i in range(3)]
    expected = 1 + sum(w * k * d / 0.6 for w, k, d in zip(weights, kept, DELTAS)) / sum(weights)

    merged = dare(GLOBAL, clients(weights=weights), context, drop=0.4, lambda_=1.0)

    assert torch.allclose(merged["encoder.w"], expected, atol=1e-6)
    assert torch.equal(merged["ids"], torch.arange(3))
