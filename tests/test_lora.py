"""LoRA adapter merges on hand-made factors: FedIT's cross term, FFA's and FlexLoRA's exact mean update."""

import pytest
import torch

from strategies.aggregation import UpdateError
from strategies.lora import adapter_modules, as_products, refactor
from strategies.options import OptionError
from strategies.rules import RULES, check_adapters, default_values, settings
from strategies.update import ClientUpdate, MergeContext

A, B = "enc.q.lora_A.default.weight", "enc.q.lora_B.default.weight"
HEAD = "heads.bio.weight"
SCALE = 2.0  # alpha / rank


def factors(seed: int, rank: int = 2, out: int = 5, inp: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {A: torch.randn(rank, inp, generator=g), B: torch.randn(out, rank, generator=g), HEAD: torch.randn(3, out, generator=g)}


def merge(rule: str, global_state, states, weights=(1.0, 3.0), context=None):
    setting = settings([rule], {})[0]
    clients = [ClientUpdate(f"node {i} (bio-{i})", f"bio-{i}", s, w) for i, (s, w) in enumerate(zip(states, weights))]
    return setting.merge(global_state, clients, context or MergeContext(adapter_scale=SCALE))


def mean_update(states, weights=(1.0, 3.0)) -> torch.Tensor:
    total = sum(weights)
    return sum(w / total * SCALE * s[B] @ s[A] for s, w in zip(states, weights))


def test_fedavg_on_factors_is_fedit_and_misses_the_mean_update_by_the_cross_term():
    global_state, states = factors(0), [factors(1), factors(2)]
    merged = merge("fedavg", global_state, states)
    p = 1.0 / 4.0
    cross = -p * (1 - p) * (states[0][B] - states[1][B]) @ (states[0][A] - states[1][A])
    fedit = SCALE * merged[B] @ merged[A]
    assert torch.allclose(fedit - mean_update(states), SCALE * cross, atol=1e-5)
    assert (SCALE * cross).abs().max() > 0.1  # the error is real, not rounding


def test_lora_exact_is_the_mean_update_when_the_rank_allows():
    global_state = factors(0, rank=2)
    states = [factors(1, rank=1), factors(2, rank=1)]  # each client's update has rank 1: the sum has rank 2
    states = [{A: torch.cat([s[A], torch.zeros(1, 4)]), B: torch.cat([s[B], torch.zeros(5, 1)], dim=1), HEAD: s[HEAD]} for s in states]
    context = MergeContext(adapter_scale=SCALE)
    merged = merge("lora-exact", global_state, states, context=context)
    assert torch.allclose(SCALE * merged[B] @ merged[A], mean_update(states), atol=1e-5)
    assert context.round_notes["lora-energy-dropped"] == pytest.approx(0.0, abs=1e-12)
    assert torch.allclose(merged[A] @ merged[A].T, torch.eye(2), atol=1e-5)  # A's rows orthonormal
    assert torch.allclose(merged[HEAD], (states[0][HEAD] + 3 * states[1][HEAD]) / 4)


def test_lora_exact_truncates_to_the_rank_and_reports_the_energy_dropped():
    global_state, states = factors(0, rank=1), [factors(1, rank=1), factors(2, rank=1)]
    context = MergeContext(adapter_scale=SCALE)
    merged = merge("lora-exact", global_state, states, context=context)
    s = torch.linalg.svdvals(mean_update(states).double())
    assert context.round_notes["lora-energy-dropped"] == pytest.approx(float(s[1:].square().sum() / s.square().sum()), rel=1e-6)
    assert torch.linalg.svdvals(SCALE * merged[B] @ merged[A])[0] == pytest.approx(float(s[0]), rel=1e-5)


def test_ffa_with_a_frozen_is_the_mean_update_exactly_and_refuses_an_a():
    global_state = factors(0)
    states = [{B: factors(i)[B], HEAD: factors(i)[HEAD]} for i in (1, 2)]  # B only: A is the global one
    merged = merge("ffa", global_state, states)
    assert A not in merged
    with_global_a = [{**s, A: global_state[A]} for s in states]
    assert torch.allclose(SCALE * merged[B] @ global_state[A], mean_update(with_global_a), atol=1e-6)
    with pytest.raises(UpdateError, match=r"node 0 \(bio-0\): sent 'enc.q.lora_A.default.weight', an A factor, which ffa keeps frozen"):
        merge("ffa", global_state, with_global_a)


def test_a_delta_rule_runs_on_the_updates_and_task_arithmetic_at_1_is_lora_exact():
    global_state, states = factors(0, rank=4), [factors(1, rank=4), factors(2, rank=4)]
    exact = merge("lora-exact", global_state, states)
    arithmetic = merge("task-arithmetic", global_state, states)
    assert torch.allclose(SCALE * arithmetic[B] @ arithmetic[A], SCALE * exact[B] @ exact[A], atol=1e-5)
    ties = merge("ties", global_state, states)
    assert ties[A].shape == global_state[A].shape and ties[B].shape == global_state[B].shape


def test_an_adapter_of_another_rank_is_refused_naming_the_client():
    global_state, states = factors(0, rank=2), [factors(1, rank=2), factors(2, rank=3)]
    with pytest.raises(UpdateError, match=r"node 1 \(bio-1\): key 'enc.q.lora_A.default.weight' has shape \(3, 4\), expected \(2, 4\)"):
        merge("lora-exact", global_state, states)


def test_refactor_of_nothing_keeps_a_live_a():
    b, a, dropped = refactor(torch.zeros(5, 4), 2, SCALE)
    assert torch.count_nonzero(b) == 0 and dropped == 0.0
    assert torch.allclose(a @ a.T, torch.eye(2), atol=1e-6)


def test_products_replace_each_pair_and_an_unpaired_factor_is_refused():
    state = factors(0)
    products = as_products(state, adapter_modules(state), SCALE)
    assert set(products) == {"enc.q.lora_update", HEAD}
    with pytest.raises(UpdateError, match="has no 'enc.q.lora_B.default.weight' beside it"):
        adapter_modules({A: state[A]})


def test_rules_that_cannot_merge_adapters_are_refused_before_any_work():
    values = default_values()
    for name in ("aligned", "fisher", "regmean", "adamerging"):
        with pytest.raises(OptionError, match=f"strategy '{name}' cannot merge LoRA adapters"):
            check_adapters(settings([name], values), "lora")
    for name in ("ffa", "lora-exact"):
        with pytest.raises(OptionError, match=f"strategy '{name}' merges LoRA adapters: expected --peft lora"):
            check_adapters(settings([name], values), "none")
    check_adapters(settings([n for n, r in RULES.items() if r.adapters], values), "lora")
