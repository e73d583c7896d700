"""Tests for strategies.permutation: exact symmetries, recovery of planted permutations, identity."""

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, BertConfig, DistilBertConfig, GPT2Config, PreTrainedModel, RobertaConfig

from strategies.permutation import (
    RESIDUAL,
    HeadGroup,
    PermutationSpec,
    aligned,
    apply_permutation,
    match_weights,
    permutation_spec,
    random_permutation,
)
from strategies.update import ClientUpdate, MergeContext

HEADS = 4
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=64, vocab_size=100,
            max_position_embeddings=64)
CONFIGS = {
    "bert": lambda: BertConfig(**TINY),
    "roberta": lambda: RobertaConfig(**TINY),
    "distilbert": lambda: DistilBertConfig(dim=32, n_layers=2, n_heads=HEADS, hidden_dim=64, vocab_size=100,
                                           max_position_embeddings=64),
}
PREFIX = "encoder."


def _model(family: str) -> PreTrainedModel:
    torch.manual_seed(0)
    return AutoModel.from_config(CONFIGS[family]()).eval()


def _full_state(family: str) -> dict[str, torch.Tensor]:
    """Encoder plus one domain head, every float tensor jittered so biases and LayerNorms are not trivial."""
    generator = torch.Generator().manual_seed(0)
    state = {PREFIX + key: value for key, value in _model(family).state_dict().items()}
    state["heads.news.weight"] = torch.zeros(3, 32)
    state["heads.news.bias"] = torch.zeros(3)
    return {
        key: value + 0.05 * torch.randn(value.shape, generator=generator) if value.is_floating_point() else value
        for key, value in state.items()
    }


def _aligned_mean(reference: dict[str, torch.Tensor], states: list, weights: list[float], residual: bool = True):
    """The aligned rule with ``reference`` as the global model."""
    clients = [ClientUpdate(f"client {i}", f"c{i}", state, w) for i, (state, w) in enumerate(zip(states, weights))]
    return aligned(reference, clients, MergeContext(num_heads=HEADS), residual=residual)


def _noisy(state: dict[str, torch.Tensor], seed: int, scale: float = 1e-3) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        key: value + scale * torch.randn(value.shape, generator=generator) if value.is_floating_point() else value
        for key, value in state.items()
    }


def _run(family: str, state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Last hidden state, head logits on its masked mean, and the pooler output (empty if none)."""
    model = _model(family)
    model.load_state_dict({key[len(PREFIX):]: value for key, value in state.items() if key.startswith(PREFIX)})
    input_ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        output = model(input_ids=input_ids, attention_mask=mask)
    hidden = output.last_hidden_state
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    logits = pooled @ state["heads.news.weight"].T + state["heads.news.bias"]
    pooler = getattr(output, "pooler_output", None)
    return hidden, logits, torch.zeros(0) if pooler is None else pooler


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_random_permutation_preserves_outputs(family: str, residual: bool) -> None:
    state = _full_state(family)
    spec = permutation_spec(state, HEADS, residual=residual)
    perms = random_permutation(spec, state, torch.Generator().manual_seed(2))

    permuted = apply_permutation(state, spec, perms)

    assert all(not torch.equal(perm, torch.arange(len(perm))) for perm in perms.values())
    assert (RESIDUAL in perms) == residual
    hidden, logits, pooler = _run(family, state)
    hidden_p, logits_p, pooler_p = _run(family, permuted)
    expected_hidden = hidden.index_select(-1, perms[RESIDUAL]) if residual else hidden
    torch.testing.assert_close(hidden_p, expected_hidden, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits_p, logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooler_p, pooler, atol=1e-5, rtol=0)


def test_apply_rejects_permutation_that_splits_heads() -> None:
    state = _full_state("bert")
    spec = permutation_spec(state, HEADS)
    perms = random_permutation(spec, state, torch.Generator().manual_seed(2))
    perms["layer.0.attn.qk"] = torch.arange(32).roll(1)  # moves one dimension of every head into the next

    with pytest.raises(ValueError, match="layer.0.attn"):
        apply_permutation(state, spec, perms)


@pytest.mark.parametrize(("family", "residual"), [("bert", False), ("bert", True), ("roberta", True), ("distilbert", True)])
def test_matching_recovers_planted_permutation(family: str, residual: bool) -> None:
    state = _full_state(family)
    spec = permutation_spec(state, HEADS, residual=residual)
    permuted = apply_permutation(state, spec, random_permutation(spec, state, torch.Generator().manual_seed(3)))

    perms = match_weights(state, permuted, spec)
    averaged = _aligned_mean(state, [state, permuted], [1.0, 3.0], residual)

    realigned = apply_permutation(permuted, spec, perms)
    assert all(torch.equal(realigned[key], value) for key, value in state.items())
    assert max((averaged[key] - value).abs().max().item() for key, value in state.items()) < 1e-6


@pytest.mark.parametrize("seed", range(4))
def test_head_matching_is_exact_optimum_over_head_structured_permutations(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    reference = {"q": torch.randn(6, 5, generator=generator), "v": torch.randn(6, 5, generator=generator)}
    # seeds 0-1: unrelated models; seeds 2-3: a noisy head-structured permutation of the reference
    other = {key: torch.randn(6, 5, generator=generator) for key in reference}
    spec = PermutationSpec({"qk": (("q", 0),), "vo": (("v", 0),)}, {"attn": HeadGroup("qk", "vo", num_heads=2)})
    if seed >= 2:
        planted = random_permutation(spec, reference, generator)
        other = {key: reference[key][planted[name]] + 0.3 * other[key] for key, name in (("q", "qk"), ("v", "vo"))}

    perms = match_weights(reference, other, spec)

    def score(qk: torch.Tensor, vo: torch.Tensor) -> float:
        return float((reference["q"] * other["q"][qk]).sum() + (reference["v"] * other["v"][vo]).sum())

    within = [torch.tensor(order) for order in itertools.permutations(range(3))]
    best = max(
        score(torch.cat([3 * h + w for h, w in zip(heads, qk)]), torch.cat([3 * h + w for h, w in zip(heads, vo)]))
        for heads in ((0, 1), (1, 0))
        for qk in itertools.product(within, repeat=2)
        for vo in itertools.product(within, repeat=2)
    )
    assert score(perms["qk"], perms["vo"]) == pytest.approx(best, rel=1e-9)


def test_aligned_rule_permutes_each_clients_own_head() -> None:
    full = _full_state("bert")
    full["heads.law.weight"] = torch.randn(2, 32, generator=torch.Generator().manual_seed(6))
    full["heads.law.bias"] = torch.zeros(2)
    spec = permutation_spec(full, HEADS, residual=True)
    permuted = apply_permutation(full, spec, random_permutation(spec, full, torch.Generator().manual_seed(3)))
    news_client = {key: value for key, value in full.items() if not key.startswith("heads.law.")}
    law_client = {key: value for key, value in permuted.items() if not key.startswith("heads.news.")}

    averaged = _aligned_mean(full, [news_client, law_client], [1.0, 1.0])

    assert set(averaged) == set(full)
    assert max((averaged[key] - value).abs().max().item() for key, value in full.items()) < 1e-6
    with pytest.raises(ValueError, match="heads.law.weight"):
        apply_permutation(law_client, permutation_spec(news_client, HEADS, residual=True), random_permutation(spec, full))


def test_matching_returns_identity_for_nearby_models() -> None:
    base = _full_state("bert")
    first, second = _noisy(base, seed=4), _noisy(base, seed=5)
    spec = permutation_spec(base, HEADS, residual=True)

    perms = match_weights(first, second, spec)
    averaged = _aligned_mean(first, [first, second], [1.0, 3.0])

    assert all(torch.equal(perm, torch.arange(len(perm))) for perm in perms.values())
    for key, value in first.items():
        expected = (value + 3.0 * second[key]) / 4.0 if value.is_floating_point() else value
        assert (averaged[key] - expected).abs().max() <= 1e-6, key


def test_unknown_architecture_is_rejected_by_name() -> None:
    torch.manual_seed(0)
    gpt2 = AutoModel.from_config(GPT2Config(n_embd=32, n_layer=1, n_head=HEADS, vocab_size=100, n_positions=64))
    gpt2_state = {PREFIX + key: value for key, value in gpt2.state_dict().items()}

    with pytest.raises(ValueError, match=r"unknown encoder architecture.*encoder\.h\.0\."):
        permutation_spec(gpt2_state, HEADS)
    with pytest.raises(ValueError, match=r"encoder\.foo\.weight"):
        permutation_spec({"encoder.foo.weight": torch.zeros(3, 3)}, HEADS)


def test_unlisted_parameter_of_known_family_is_rejected() -> None:
    state = _full_state("bert")
    key = "encoder.encoder.layer.0.attention.self.distance_embedding.weight"
    state[key] = torch.zeros(127, 8)

    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        permutation_spec(state, HEADS, residual=True)


def test_bench_small_recovers_planted_permutation(tmp_path: Path) -> None:
    out = tmp_path / "align.json"
    script = Path(__file__).resolve().parents[1] / "bench" / "align.py"

    subprocess.run([sys.executable, str(script), "--small", "--out", str(out)], check=True, capture_output=True)

    result = json.loads(out.read_text())
    assert result["ours_recovered"] and result["reference_recovered"]
    assert result["ours_s"] > 0 and result["reference_s"] > 0
