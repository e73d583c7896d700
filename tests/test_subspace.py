"""TSV-Merge, Iso-C and Iso-CTS against their definitions on tiny matrices, and their fallback for other keys."""

import functools

import pytest
import torch

from strategies.subspace import iso_c, iso_cts, singular_vector_sum, tsv
from strategies.update import ClientUpdate, MergeContext

KEY = "encoder.layer.0.dense.weight"
ATOL = 1e-5


def random(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def orthonormal(rows: int, columns: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(random(rows, columns, seed=seed))[0]


def updates(global_state: dict, deltas: list[dict], weights: list[float] | None = None) -> list[ClientUpdate]:
    """One client per dict of deltas; integer tensors are sent as they are."""
    weights = weights or [1.0] * len(deltas)
    return [
        ClientUpdate(f"node {i}", f"c{i}", {k: global_state[k] + d if d.is_floating_point() else d for k, d in delta.items()}, w)
        for i, (delta, w) in enumerate(zip(deltas, weights))
    ]


RULES = {
    "tsv": functools.partial(tsv, share=1.0),
    "iso_c": iso_c,
    "iso_cts": functools.partial(iso_cts, common=0.8),
}


def test_iso_c_flattens_the_spectrum_of_the_summed_delta_and_keeps_its_singular_vectors() -> None:
    global_state = {KEY: random(6, 4, seed=0)}
    deltas = [random(6, 4, seed=s) for s in (1, 2, 3)]
    u, s, vh = torch.linalg.svd(sum(deltas), full_matrices=False)

    merged = iso_c(global_state, updates(global_state, [{KEY: d} for d in deltas]), MergeContext(), lambda_=1.5)
    delta = (merged[KEY] - global_state[KEY]) / 1.5

    assert s.max() > 1.5 * s.min()  # the summed spectrum is not flat already
    assert torch.allclose(torch.linalg.svdvals(delta), s.mean().expand(4), atol=ATOL)
    assert torch.allclose(delta, u @ torch.diag(s.mean().expand(4)) @ vh, atol=ATOL)


def test_tsv_of_one_client_at_full_share_is_that_client() -> None:
    global_state = {KEY: random(6, 4, seed=0)}
    delta = random(6, 4, seed=1)

    merged = tsv(global_state, updates(global_state, [{KEY: delta}]), MergeContext(), share=1.0, lambda_=1.0)

    assert torch.allclose(merged[KEY], global_state[KEY] + delta, atol=ATOL)
    # The rule hands a lone client its own delta; the SVD path alone gives the same, and truncates below share 1.
    assert torch.allclose(singular_vector_sum([delta], 1.0), delta, atol=ATOL)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    assert torch.allclose(singular_vector_sum([delta], 0.5), u[:, :2] @ torch.diag(s[:2]) @ vh[:2], atol=ATOL)


def test_tsv_of_deltas_in_orthogonal_subspaces_is_their_sum() -> None:
    # Rank-2 deltas on disjoint halves of orthonormal bases: at share 1 each of the 2 clients keeps rank 4 / 2 = 2,
    # so nothing is truncated and the concatenated singular vectors are orthonormal already.
    u, v = orthonormal(6, 4, seed=1), orthonormal(4, 4, seed=2)
    deltas = [u[:, :2] @ torch.diag(torch.tensor([3.0, 1.0])) @ v[:, :2].T, u[:, 2:] @ torch.diag(torch.tensor([2.0, 0.5])) @ v[:, 2:].T]
    global_state = {KEY: random(6, 4, seed=0)}

    merged = tsv(global_state, updates(global_state, [{KEY: d} for d in deltas]), MergeContext(), share=1.0, lambda_=1.0)

    assert torch.allclose(merged[KEY], global_state[KEY] + deltas[0] + deltas[1], atol=ATOL)


def test_tsv_decorrelates_overlapping_subspaces_into_an_orthonormal_basis() -> None:
    # Two rank-1 deltas along directions 60 degrees apart: TSV keeps both singular values (2 and 1) but on
    # orthonormalised directions, unlike their sum.
    a, b = torch.zeros(6, 1), torch.zeros(6, 1)
    a[0], b[0], b[1] = 1.0, 0.5, 3**0.5 / 2
    right = orthonormal(4, 2, seed=3)
    deltas = [2.0 * a @ right[:, :1].T, b @ right[:, 1:].T]
    global_state = {KEY: torch.zeros(6, 4)}

    merged = tsv(global_state, updates(global_state, [{KEY: d} for d in deltas]), MergeContext(), share=0.5, lambda_=1.0)

    assert torch.allclose(torch.linalg.svdvals(merged[KEY])[:2], torch.tensor([2.0, 1.0]), atol=ATOL)
    assert not torch.allclose(torch.linalg.svdvals(deltas[0] + deltas[1])[:2], torch.tensor([2.0, 1.0]), atol=1e-2)


def test_iso_cts_with_the_whole_rank_common_is_iso_c() -> None:
    global_state = {KEY: random(6, 4, seed=0)}
    clients = updates(global_state, [{KEY: random(6, 4, seed=s)} for s in (1, 2, 3)])

    cts = iso_cts(global_state, clients, MergeContext(), common=1.0, lambda_=1.0)
    c = iso_c(global_state, clients, MergeContext(), lambda_=1.0)

    assert torch.allclose(cts[KEY], c[KEY], atol=ATOL)


def test_iso_cts_adds_task_specific_directions_at_the_mean_kept_singular_value() -> None:
    # r = 4, common 0.5: 2 common directions, (4 - 2) / 2 = 1 task-specific direction per client, all rebuilt with
    # the mean of the kept singular values (the sum's top 2, each projected delta's top 1), as the authors' code does;
    # the common left subspace is kept.
    global_state = {KEY: random(6, 4, seed=0)}
    deltas = [random(6, 4, seed=s) for s in (1, 2)]
    u, s, _ = torch.linalg.svd(sum(deltas), full_matrices=False)
    common = u[:, :2]
    specific = [torch.linalg.svdvals(d - common @ (common.T @ d))[0] for d in deltas]
    level = torch.cat([s[:2], torch.stack(specific)]).mean()

    merged = iso_cts(global_state, updates(global_state, [{KEY: d} for d in deltas]), MergeContext(), common=0.5, lambda_=1.0)
    delta = merged[KEY] - global_state[KEY]

    assert torch.allclose(torch.linalg.svdvals(delta), level.expand(4), atol=ATOL)
    along = delta.T @ common  # the common directions are in delta's column space: projecting loses nothing
    assert torch.allclose(torch.linalg.norm(along), level * 2**0.5, atol=ATOL)
    assert not torch.allclose(merged[KEY], iso_c(global_state, updates(global_state, [{KEY: d} for d in deltas]), MergeContext(), lambda_=1.0)[KEY], atol=1e-3)


@pytest.mark.parametrize("name", sorted(RULES))
def test_other_keys_get_the_weighted_mean_delta_lone_keys_their_client_and_dtypes_are_kept(name: str) -> None:
    rule = RULES[name]
    global_state = {
        KEY: random(6, 4, seed=0),
        "encoder.layer.0.dense.bias": random(6, seed=1),
        "embeddings.word_embeddings.weight": random(5, 4, seed=2),
        "encoder.half.weight": random(6, 4, seed=3).half(),
        "heads.bio.weight": random(2, 4, seed=4),
        "heads.legal.weight": random(3, 4, seed=5),
        "position_ids": torch.arange(4),
    }
    shared = [KEY, "encoder.layer.0.dense.bias", "embeddings.word_embeddings.weight", "encoder.half.weight"]
    deltas = [
        {**{k: random(*global_state[k].shape, seed=10 + i).to(global_state[k].dtype) for k in shared}, head: random(*global_state[head].shape, seed=20 + i)}
        for i, head in enumerate(["heads.bio.weight", "heads.legal.weight"])
    ]
    for d in deltas:
        d["position_ids"] = torch.arange(4)
    clients = updates(global_state, deltas, weights=[1.0, 3.0])

    merged = rule(global_state, clients, MergeContext(), lambda_=1.0)

    assert set(merged) == set(global_state)
    for key in ["encoder.layer.0.dense.bias", "embeddings.word_embeddings.weight"]:
        mean = (deltas[0][key] + 3.0 * deltas[1][key]) / 4.0
        assert torch.allclose(merged[key], global_state[key] + mean, atol=ATOL), key
    assert torch.allclose(merged["heads.bio.weight"], clients[0].state["heads.bio.weight"], atol=ATOL)
    assert torch.allclose(merged["heads.legal.weight"], clients[1].state["heads.legal.weight"], atol=ATOL)
    assert torch.equal(merged["position_ids"], torch.arange(4))
    assert merged["encoder.half.weight"].dtype == torch.float16
    assert merged[KEY].dtype == torch.float32
    # The half matrix goes through the same SVD merge as a float32 copy of it, rounded once at the end.
    as_float = {"encoder.half.weight": global_state["encoder.half.weight"].float()}
    floats = updates(as_float, [{"encoder.half.weight": d["encoder.half.weight"].float()} for d in deltas], weights=[1.0, 3.0])
    expected = rule(as_float, floats, MergeContext(), lambda_=1.0)["encoder.half.weight"]
    assert torch.allclose(merged["encoder.half.weight"].float(), expected, atol=1e-2)
    # ...which is not the fallback mean (the matrix rule did apply).
    mean = (deltas[0][KEY] + 3.0 * deltas[1][KEY]) / 4.0
    assert not torch.allclose(merged[KEY], global_state[KEY] + mean, atol=1e-2)


@pytest.mark.parametrize("name", sorted(RULES))
def test_lambda_scales_the_merged_delta(name: str) -> None:
    rule = RULES[name]
    global_state = {KEY: random(6, 4, seed=0), "encoder.bias": random(6, seed=1)}
    clients = updates(global_state, [{KEY: random(6, 4, seed=s), "encoder.bias": random(6, seed=10 + s)} for s in (2, 3, 4)])

    one = rule(global_state, clients, MergeContext(), lambda_=1.0)
    scaled = rule(global_state, clients, MergeContext(), lambda_=0.4)

    for key, base in global_state.items():
        assert not torch.allclose(one[key], base, atol=1e-2), key
        assert torch.allclose(scaled[key] - base, 0.4 * (one[key] - base), atol=ATOL), key
