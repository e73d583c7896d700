"""Median, trimmed mean, norm clipping and multi-Krum against numpy hand computations, per key and head-aware,
and what one attacker scaling its update by 1e6 does to them and to FedAvg."""

import numpy as np
import pytest
import torch

from strategies.rules import settings
from strategies.update import ClientUpdate, MergeContext

rng = np.random.default_rng(0)
GLOBAL_NP = {"encoder.w": rng.normal(size=4), "heads.bio.weight": rng.normal(size=2), "heads.legal.weight": rng.normal(size=2)}
GLOBAL = {
    **{k: torch.tensor(v, dtype=torch.float32) for k, v in GLOBAL_NP.items()},
    "heads.news.weight": torch.zeros(2),  # nobody sends it
    "embeddings.position_ids": torch.arange(3),
}
DOMAINS = ["bio", "bio", "bio", "legal", "legal", "legal"]
WEIGHTS = np.array([1.0, 2.0, 3.0, 1.0, 2.0, 4.0])
ENCODERS = rng.normal(size=(6, 4)).astype(np.float32)
HEADS = rng.normal(size=(6, 2)).astype(np.float32)


def updates(encoders=ENCODERS, heads=HEADS, domains=DOMAINS, weights=WEIGHTS) -> list[ClientUpdate]:
    """One client per row: the encoder, its own domain's head and the position ids."""
    return [
        ClientUpdate(
            f"node {i} ({d}-{i})", f"{d}-{i}",
            {"encoder.w": torch.tensor(e), f"heads.{d}.weight": torch.tensor(h), "embeddings.position_ids": torch.arange(3)},
            float(w),
        )
        for i, (e, h, d, w) in enumerate(zip(encoders, heads, domains, weights))
    ]


def merge(name: str, clients: list[ClientUpdate], **values: object) -> tuple[dict[str, torch.Tensor], MergeContext]:
    (setting,) = settings([name], {f"{name}-{k}": v for k, v in values.items()})
    context = MergeContext()
    return setting.merge(GLOBAL, clients, context), context


def of(domain: str, domains=DOMAINS) -> list[int]:
    return [i for i, d in enumerate(domains) if d == domain]


def trimmed(values: np.ndarray, k: int) -> np.ndarray:
    return np.sort(values, axis=0)[k : len(values) - k].mean(axis=0)


def close(actual: torch.Tensor, expected: np.ndarray) -> None:
    np.testing.assert_allclose(actual.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_median_is_the_unweighted_coordinate_wise_median_of_each_keys_senders() -> None:
    merged, _ = merge("median", updates())

    close(merged["encoder.w"], np.median(ENCODERS, axis=0))  # six senders: mean of the two middle values
    close(merged["heads.bio.weight"], np.median(HEADS[of("bio")], axis=0))
    close(merged["heads.legal.weight"], np.median(HEADS[of("legal")], axis=0))
    assert torch.equal(merged["embeddings.position_ids"], torch.arange(3))
    assert "heads.news.weight" not in merged


@pytest.mark.parametrize(("beta", "encoder_trim", "head_trim"), [(0.2, 1, 0), (0.34, 2, 1)])
def test_trimmed_mean_drops_floor_beta_n_values_at_each_end_of_each_keys_senders(beta: float, encoder_trim: int, head_trim: int) -> None:
    merged, _ = merge("trimmed-mean", updates(), beta=beta)

    close(merged["encoder.w"], trimmed(ENCODERS, encoder_trim))  # n = 6
    close(merged["heads.bio.weight"], trimmed(HEADS[of("bio")], head_trim))  # n = 3: 0.2 x 3 < 1 trims nothing
    close(merged["heads.legal.weight"], trimmed(HEADS[of("legal")], head_trim))
    assert "heads.news.weight" not in merged


def clipped(bound: float | None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Clipping by hand: each client's delta norm over encoder + its head, scaled to ``bound`` (None: the median)."""
    enc = ENCODERS - GLOBAL_NP["encoder.w"]
    head = np.array([h - GLOBAL_NP[f"heads.{d}.weight"] for h, d in zip(HEADS, DOMAINS)])
    norms = np.sqrt((enc**2).sum(axis=1) + (head**2).sum(axis=1))
    limit = np.median(norms) if bound is None else bound
    scales = np.minimum(1.0, limit / norms)
    expected = {"encoder.w": GLOBAL_NP["encoder.w"] + (WEIGHTS * scales) @ enc / WEIGHTS.sum()}
    for domain in ("bio", "legal"):
        rows = of(domain)
        expected[f"heads.{domain}.weight"] = GLOBAL_NP[f"heads.{domain}.weight"] + (WEIGHTS[rows] * scales[rows]) @ head[rows] / WEIGHTS[rows].sum()
    return expected, scales


@pytest.mark.parametrize("bound", [1.5, None])
def test_clip_scales_each_delta_to_the_bound_then_takes_the_weighted_mean_per_key(bound: float | None) -> None:
    expected, scales = clipped(bound)
    clients = updates()

    merged, context = merge("clip", clients, bound=bound or 0.0)

    assert (scales < 1).any() and (scales == 1).any()  # the bound clips some clients and not others
    for key, value in expected.items():
        close(merged[key], value)
    assert [context.notes[c.name]["clip-scale"] for c in clients] == pytest.approx(list(scales), rel=1e-5)
    assert torch.equal(merged["embeddings.position_ids"], torch.arange(3))
    assert "heads.news.weight" not in merged


def krum_scores(encoders: np.ndarray, f: int) -> np.ndarray:
    distances = ((encoders[:, None, :] - encoders[None, :, :]) ** 2).sum(axis=2)
    n = len(encoders)
    return np.array([np.sort(np.delete(distances[i], i))[: n - f - 2].sum() for i in range(n)])


def weighted(values: np.ndarray, rows: list[int], weights=WEIGHTS) -> np.ndarray:
    return np.average(values[rows], axis=0, weights=weights[rows])


def test_multi_krum_averages_the_n_minus_f_lowest_scores_and_each_head_over_its_selected_senders() -> None:
    encoders = ENCODERS.copy()
    encoders[4] += 5.0  # legal-4 is far from everyone
    selected = sorted(np.argsort(krum_scores(encoders, f=1))[:5])  # n - f = 5 of 6
    clients = updates(encoders=encoders)

    merged, context = merge("krum", clients, f=1)

    assert selected == [0, 1, 2, 3, 5]
    close(merged["encoder.w"], weighted(encoders, selected))
    close(merged["heads.bio.weight"], weighted(HEADS, [0, 1, 2]))
    close(merged["heads.legal.weight"], weighted(HEADS, [3, 5]))
    assert [context.notes[c.name]["krum-selected"] for c in clients] == [True, True, True, True, False, True]
    assert torch.equal(merged["embeddings.position_ids"], torch.arange(3))
    assert "heads.news.weight" not in merged


def test_a_head_whose_whole_domain_krum_left_out_runs_krum_among_its_own_senders() -> None:
    # 4 bio clients close together, 3 legal ones looser and far away: with f = 3 the encoder keeps the 4 bio.
    # The legal head then runs Krum among the 3 legal clients on the head: n - f = 0 -> 1 kept, 1 neighbour;
    # the two close heads tie (each one's score is the distance between them), so both are kept.
    domains = ["bio"] * 4 + ["legal"] * 3
    weights = np.array([1.0, 2.0, 1.0, 3.0, 1.0, 2.0, 5.0])
    rng = np.random.default_rng(1)
    base = rng.normal(size=4).astype(np.float32)
    encoders = np.concatenate([base + 0.01 * rng.normal(size=(4, 4)), base + 3.0 + rng.normal(size=(3, 4))]).astype(np.float32)
    heads = rng.normal(size=(7, 2)).astype(np.float32)
    heads[5] = heads[4] + 0.01
    heads[6] = heads[4] + 10.0
    clients = updates(encoders, heads, domains, weights)

    merged, context = merge("krum", clients, f=3)

    assert sorted(np.argsort(krum_scores(encoders, f=3))[:4]) == [0, 1, 2, 3]
    close(merged["encoder.w"], weighted(encoders, [0, 1, 2, 3], weights))
    close(merged["heads.bio.weight"], weighted(heads, [0, 1, 2, 3], weights))
    close(merged["heads.legal.weight"], weighted(heads, [4, 5], weights))
    assert [context.notes[c.name]["krum-selected"] for c in clients] == [True] * 4 + [False] * 3


def test_two_clients_median_and_trimmed_mean_are_their_unweighted_mean_krum_their_fedavg_clip_shrinks_the_larger() -> None:
    encoders, heads = ENCODERS[:2], HEADS[:2]
    weights = np.array([1.0, 3.0])
    clients = updates(encoders, heads, ["bio", "bio"], weights)
    enc = encoders - GLOBAL_NP["encoder.w"]
    head = heads - GLOBAL_NP["heads.bio.weight"]
    norms = np.sqrt((enc**2).sum(axis=1) + (head**2).sum(axis=1))
    scales = np.minimum(1.0, norms.mean() / norms)  # the median of two norms is their mean

    results = {
        "median": merge("median", clients)[0],
        "trimmed-mean 0.49": merge("trimmed-mean", clients, beta=0.49)[0],
        "krum f=1": merge("krum", clients, f=1)[0],
        "krum f=5": merge("krum", clients, f=5)[0],
        "clip": merge("clip", clients)[0],
    }

    for name in ("median", "trimmed-mean 0.49"):
        close(results[name]["encoder.w"], encoders.mean(axis=0))
        close(results[name]["heads.bio.weight"], heads.mean(axis=0))
    for name in ("krum f=1", "krum f=5"):
        close(results[name]["encoder.w"], np.average(encoders, axis=0, weights=weights))
        close(results[name]["heads.bio.weight"], np.average(heads, axis=0, weights=weights))
    assert sorted(scales) == [pytest.approx(norms.mean() / norms.max()), 1.0]
    close(results["clip"]["encoder.w"], GLOBAL_NP["encoder.w"] + (weights * scales) @ enc / weights.sum())


ATTACK_RULES = {"fedavg": {}, "median": {}, "trimmed-mean": {"beta": 0.25}, "clip": {}, "krum": {"f": 1}}


@pytest.mark.parametrize("attacker_domain", ["bio", "legal"])
def test_one_attacker_scaling_its_delta_by_1e6_drags_fedavg_but_moves_the_robust_rules_less_than_the_honest_spread(attacker_domain: str) -> None:
    # Six honest clients pull the same way (a common delta plus noise); a seventh sends global + 1e6 x its delta.
    domains = [*DOMAINS, attacker_domain]
    weights = np.array([*WEIGHTS, 2.0])
    rng = np.random.default_rng(2)
    common = {"encoder.w": rng.normal(size=4), "head": rng.normal(size=2)}
    deltas = {key: c + 0.1 * rng.normal(size=(7, len(c))) for key, c in common.items()}
    deltas = {key: d * np.array([1.0] * 6 + [1e6])[:, None] for key, d in deltas.items()}
    encoders = (GLOBAL_NP["encoder.w"] + deltas["encoder.w"]).astype(np.float32)
    heads = np.array([GLOBAL_NP[f"heads.{d}.weight"] + h for d, h in zip(domains, deltas["head"])], dtype=np.float32)
    everyone = updates(encoders, heads, domains, weights)
    honest = everyone[:6]
    spread = {
        "encoder.w": np.ptp(encoders[:6], axis=0).max(),
        **{f"heads.{d}.weight": np.ptp(heads[of(d)], axis=0).max() for d in ("bio", "legal")},  # of(d) is honest only
    }

    moved = {}
    for name, values in ATTACK_RULES.items():
        attacked, context = merge(name, everyone, **values)
        clean, _ = merge(name, honest, **values)
        moved[name] = {key: float((attacked[key] - clean[key]).abs().max()) for key in spread}

    attacked_keys = ["encoder.w", f"heads.{attacker_domain}.weight"]
    assert all(moved["fedavg"][key] > 1e3 * spread[key] for key in attacked_keys), moved["fedavg"]
    for name in ("median", "trimmed-mean", "clip", "krum"):
        assert all(moved[name][key] <= spread[key] for key in spread), (name, moved[name], spread)
    assert context.notes[everyone[6].name]["krum-selected"] is False  # context of the last rule: krum
    if attacker_domain == "legal":  # the other domain's head never sees the attacker's values
        for name in ("median", "trimmed-mean"):
            assert moved[name]["heads.bio.weight"] == 0.0
