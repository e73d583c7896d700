"""Model Stock and Model Breadcrumbs against hand computations, per key and head-aware."""

import itertools

import pytest
import torch

from strategies.stock import band, breadcrumbs, model_stock
from strategies.task_vectors import task_arithmetic
from strategies.update import ClientUpdate, MergeContext

GLOBAL = {"encoder.w": torch.ones(3), "ids": torch.arange(3)}


def clients(deltas, weights=None, global_state=GLOBAL) -> list[ClientUpdate]:
    weights = weights or [1.0] * len(deltas)
    return [
        ClientUpdate(f"node {i}", f"c{i}", {"encoder.w": global_state["encoder.w"] + d, "ids": torch.arange(3)}, w)
        for i, (d, w) in enumerate(zip(deltas, weights))
    ]


def stock_t(merged: torch.Tensor, mean_delta: torch.Tensor) -> float:
    """The t that ``merged = global + t * mean_delta`` implies."""
    return float(torch.dot(merged - GLOBAL["encoder.w"], mean_delta) / torch.dot(mean_delta, mean_delta))


def test_model_stock_keeps_the_global_weights_for_orthogonal_deltas() -> None:
    deltas = [torch.tensor([2.0, 0.0, 0.0]), torch.tensor([0.0, 2.0, 0.0])]  # cos 0 -> t 0

    merged = model_stock(GLOBAL, clients(deltas), MergeContext())

    assert torch.allclose(merged["encoder.w"], GLOBAL["encoder.w"], atol=1e-6)
    assert torch.equal(merged["ids"], torch.arange(3))


def test_model_stock_takes_the_mean_for_equal_deltas() -> None:
    delta = torch.tensor([1.0, -2.0, 0.5])  # cos 1 -> t 1

    merged = model_stock(GLOBAL, clients([delta, delta.clone()]), MergeContext())

    assert torch.allclose(merged["encoder.w"], GLOBAL["encoder.w"] + delta, atol=1e-6)


def test_model_stock_follows_the_papers_closed_form_and_weights_the_mean_by_examples() -> None:
    deltas = [torch.tensor([1.0, 1.0, 0.0]), torch.tensor([3.0, 0.0, 3.0])]  # cos = 3 / (sqrt 2 * sqrt 18) = 0.5
    weights = [1.0, 3.0]
    mean_delta = (deltas[0] + 3 * deltas[1]) / 4

    merged = model_stock(GLOBAL, clients(deltas, weights), MergeContext())

    t = 2 * 0.5 / (1 + 0.5)  # N cos / (1 + (N - 1) cos) = 2/3
    assert stock_t(merged["encoder.w"], mean_delta) == pytest.approx(t, abs=1e-6)
    assert torch.allclose(merged["encoder.w"], GLOBAL["encoder.w"] + t * mean_delta, atol=1e-6)


def test_model_stock_averages_the_pairwise_cosines_of_three_clients_and_clips_negative_ones() -> None:
    generator = torch.Generator().manual_seed(0)
    deltas = [torch.randn(3, generator=generator) + torch.tensor([2.0, 0.0, 0.0]) for _ in range(3)]
    units = [d / d.norm() for d in deltas]
    cos = sum(float(torch.dot(a, b)) for a, b in itertools.combinations(units, 2)) / 3
    assert 0 < cos < 1  # the draw gives an interior angle, else this test would not check the formula
    t = 3 * cos / (1 + 2 * cos)

    merged = model_stock(GLOBAL, clients(deltas), MergeContext())
    opposite = model_stock(GLOBAL, clients([deltas[0], -deltas[0]]), MergeContext())  # cos -1 -> clipped to 0

    assert torch.allclose(merged["encoder.w"], GLOBAL["encoder.w"] + t * sum(deltas) / 3, atol=1e-5)
    assert torch.allclose(opposite["encoder.w"], GLOBAL["encoder.w"], atol=1e-6)


def test_model_stock_counts_a_zero_delta_as_cosine_0() -> None:
    delta = torch.tensor([1.0, 2.0, 3.0])
    # pairs: (d, d) cos 1, (d, 0) cos 0 twice -> mean 1/3 -> t = 3 (1/3) / (1 + 2/3) = 3/5
    merged = model_stock(GLOBAL, clients([delta, delta.clone(), torch.zeros(3)]), MergeContext())

    assert torch.allclose(merged["encoder.w"], GLOBAL["encoder.w"] + 0.6 * (2 * delta / 3), atol=1e-6)


def test_breadcrumbs_without_masking_is_task_arithmetic() -> None:
    generator = torch.Generator().manual_seed(1)
    deltas = [torch.randn(3, generator=generator) for _ in range(3)]
    updates = clients(deltas, [1.0, 2.0, 5.0])

    crumbs = breadcrumbs(GLOBAL, updates, MergeContext(), density=1.0, outliers=0.0, lambda_=0.7)
    plain = task_arithmetic(GLOBAL, updates, MergeContext(), lambda_=0.7)

    assert torch.allclose(crumbs["encoder.w"], plain["encoder.w"], atol=1e-6)
    assert torch.equal(crumbs["ids"], plain["ids"])


def test_breadcrumbs_drops_the_top_outliers_and_the_smallest_entries() -> None:
    # magnitudes ranked: 9 (-9), 8, 7 (-7), 6, 5, 4, 3, 2, 1, 0.5 (n = 10)
    delta = torch.tensor([0.5, -9.0, 4.0, 8.0, -7.0, 1.0, 6.0, -3.0, 5.0, 2.0])
    global_state = {"encoder.w": torch.zeros(10)}
    update = ClientUpdate("n0", "c0", {"encoder.w": delta.clone()}, 2.0)

    # outliers 0.2: drop the top floor(2) = 2 (|-9|, 8); density 0.4: keep the next ceil(4) = 4 (-7, 6, 5, 4)
    merged = breadcrumbs(global_state, [update], MergeContext(), density=0.4, outliers=0.2, lambda_=0.5)

    kept = torch.tensor([0.0, 0.0, 4.0, 0.0, -7.0, 0.0, 6.0, 0.0, 5.0, 0.0])
    assert torch.equal(merged["encoder.w"], 0.5 * kept)


def test_breadcrumbs_masks_each_client_separately_then_takes_the_weighted_mean() -> None:
    global_state = {"encoder.w": torch.ones(4)}
    a = ClientUpdate("n0", "a", {"encoder.w": 1 + torch.tensor([10.0, 3.0, 2.0, 0.1])}, 1.0)
    b = ClientUpdate("n1", "b", {"encoder.w": 1 + torch.tensor([1.0, -0.2, -4.0, 2.0])}, 3.0)

    # n = 4: outliers 0.25 drops the top 1, density 0.5 keeps the next 2
    # a keeps [0, 3, 2, 0]; b keeps [1, 0, 0, 2] -> weighted mean (a + 3 b) / 4 = [0.75, 0.75, 0.5, 1.5]
    merged = breadcrumbs(global_state, [a, b], MergeContext(), density=0.5, outliers=0.25, lambda_=1.0)

    assert torch.allclose(merged["encoder.w"], 1 + torch.tensor([0.75, 0.75, 0.5, 1.5]))


def test_the_band_rounds_as_documented_and_keeps_every_entry_tied_at_a_cut() -> None:
    magnitudes = torch.tensor([5.0, 5.0, 3.0, 1.0, 1.0])

    assert band(magnitudes, density=0.2, outliers=0.2) == (5.0, 5.0)  # the 2nd 5 ties the dropped one: both stay
    assert band(magnitudes, density=0.8, outliers=0.0) == (float("inf"), 1.0)  # 4 kept, plus the tied 1
    assert band(magnitudes, density=0.0, outliers=0.2) == (float("-inf"), float("inf"))  # nothing kept
    # rounding: floor(0.01 * 3) = 0 outliers dropped, ceil(0.5 * 3) = 2 kept
    assert band(torch.tensor([3.0, 1.0, 2.0]), density=0.5, outliers=0.01) == (float("inf"), 2.0)


def test_integers_pass_through_a_head_sent_by_one_client_and_a_float16_global_keeps_its_dtype() -> None:
    global_state = {
        "encoder.w": torch.zeros(2, dtype=torch.float16),
        "heads.bio.weight": torch.zeros(4, dtype=torch.float16),
        "heads.legal.weight": torch.full((2,), 9.0, dtype=torch.float16),
        "ids": torch.arange(3),
    }
    bio_head = torch.tensor([4.0, -1.0, 2.0, 0.5], dtype=torch.float16)
    bio_state = {"encoder.w": torch.tensor([1.0, 0.0], dtype=torch.float16), "heads.bio.weight": bio_head, "ids": torch.arange(3)}
    bio = ClientUpdate("n0", "bio-0", bio_state, 1.0)
    legal = ClientUpdate("n1", "legal-0", {"encoder.w": torch.tensor([0.0, 1.0], dtype=torch.float16), "ids": torch.arange(3)}, 1.0)

    stock = model_stock(global_state, [bio, legal], MergeContext())
    crumbs = breadcrumbs(global_state, [bio, legal], MergeContext(), density=0.5, outliers=0.25, lambda_=1.0)

    assert torch.equal(stock["heads.bio.weight"], bio_head)  # one client: t = 1, its own weights
    assert torch.equal(stock["encoder.w"], torch.zeros(2, dtype=torch.float16))  # orthogonal deltas: t = 0
    assert torch.equal(crumbs["heads.bio.weight"], torch.tensor([0.0, -1.0, 2.0, 0.0], dtype=torch.float16))  # drop 4, keep 2 and -1
    for merged in (stock, crumbs):
        assert "heads.legal.weight" not in merged  # nobody sent it: the caller keeps the global value
        assert torch.equal(merged["ids"], torch.arange(3))
        assert {k: v.dtype for k, v in merged.items()} == {
            "encoder.w": torch.float16,
            "heads.bio.weight": torch.float16,
            "ids": torch.int64,
        }


def test_breadcrumbs_rejects_fractions_out_of_range() -> None:
    with pytest.raises(ValueError, match="outliers"):
        breadcrumbs(GLOBAL, clients([torch.ones(3)]), MergeContext(), density=0.9, outliers=1.0, lambda_=1.0)
