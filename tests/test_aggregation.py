"""Tests for strategies/aggregation.py: key-wise weighted mean and update checks, on toy tensors and a tiny BERT."""

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel

from strategies.aggregation import StreamingMean, UpdateError, as_tensors, check_update, weighted_mean

TINY_BERT = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100)


@pytest.fixture(scope="module")
def bert_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {f"encoder.{k}": v for k, v in BertModel(TINY_BERT).state_dict().items()}


def noisy_copies(state: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [{k: v + 0.1 * torch.randn(v.shape, generator=generator) for k, v in state.items()} for _ in range(n)]


def head(value: float) -> dict[str, torch.Tensor]:
    return {"weight": torch.full((2, 4), value), "bias": torch.full((2,), -value)}


def test_weighted_mean_equals_hand_computed_fedavg():
    a = {"encoder.w": torch.tensor([1.0, 2.0]), "encoder.b": torch.tensor([0.0])}
    b = {"encoder.w": torch.tensor([3.0, 6.0]), "encoder.b": torch.tensor([4.0])}

    merged = weighted_mean([(a, 1), (b, 3)])

    # w: (1*1 + 3*3)/4 = 2.5, (1*2 + 3*6)/4 = 5.0;  b: (1*0 + 3*4)/4 = 3.0
    assert torch.equal(merged["encoder.w"], torch.tensor([2.5, 5.0]))
    assert torch.equal(merged["encoder.b"], torch.tensor([3.0]))


def test_domain_head_is_averaged_only_over_its_own_clients():
    encoders = [{"encoder.w": torch.full((3,), v)} for v in (1.0, 2.0, 4.0)]
    bio_1 = encoders[0] | {f"heads.bio.{k}": v for k, v in head(1.0).items()}
    bio_2 = encoders[1] | {f"heads.bio.{k}": v for k, v in head(5.0).items()}
    legal = encoders[2] | {f"heads.legal.{k}": v for k, v in head(7.0).items()}

    merged = weighted_mean([(bio_1, 10), (bio_2, 30), (legal, 5)])

    assert torch.equal(merged["heads.legal.weight"], legal["heads.legal.weight"])
    assert torch.equal(merged["heads.legal.bias"], legal["heads.legal.bias"])
    assert torch.allclose(merged["heads.bio.weight"], torch.full((2, 4), (10 * 1.0 + 30 * 5.0) / 40))
    assert torch.allclose(merged["heads.bio.bias"], torch.full((2,), -(10 * 1.0 + 30 * 5.0) / 40))
    assert torch.allclose(merged["encoder.w"], torch.full((3,), (10 * 1.0 + 30 * 2.0 + 5 * 4.0) / 45))
    assert set(merged) == set(bio_1) | set(legal)


@pytest.mark.parametrize("num_clients", [1, 2, 7])
@pytest.mark.parametrize("equal_weights", [True, False])
def test_streaming_mean_matches_stacked_mean(bert_state, num_clients, equal_weights):
    clients = noisy_copies(bert_state, num_clients)
    weights = [100.0] * num_clients if equal_weights else [float(10 + 17 * i) for i in range(num_clients)]

    merged = weighted_mean(zip(clients, weights))

    w = torch.tensor(weights)
    for key, value in bert_state.items():
        stacked = torch.stack([c[key] for c in clients])
        expected = stacked.mean(0) if equal_weights else (stacked * w.view(-1, *[1] * value.dim())).sum(0) / w.sum()
        assert merged[key].dtype == value.dtype
        torch.testing.assert_close(merged[key], expected, rtol=0, atol=1e-6, msg=key)
    assert set(merged) == set(bert_state)


def test_numpy_inputs_are_viewed_not_copied_and_read_only_ones_work():
    writable = np.arange(4, dtype=np.float32)
    read_only = np.frombuffer(np.array([2.0, 4.0, 6.0, 8.0], dtype=np.float32).tobytes(), dtype=np.float32)

    merged = weighted_mean([({"encoder.w": writable}, 1.0), ({"encoder.w": read_only}, 1.0)])

    assert as_tensors({"w": writable})["w"].data_ptr() == writable.ctypes.data
    assert torch.equal(merged["encoder.w"], torch.tensor([1.0, 2.5, 4.0, 5.5]))


def test_result_does_not_alias_the_inputs():
    ids = torch.arange(4)
    weights = torch.ones(3)
    mean = StreamingMean()
    mean.add({"encoder.position_ids": ids, "encoder.w": weights}, 2.0)

    ids += 10
    weights += 10
    merged = mean.result()

    assert torch.equal(merged["encoder.position_ids"], torch.arange(4))
    assert torch.equal(merged["encoder.w"], torch.ones(3))


def test_low_precision_inputs_come_back_in_their_dtype():
    a = {"encoder.w": torch.tensor([1.0, 3.0], dtype=torch.float16)}
    b = {"encoder.w": torch.tensor([2.0, 5.0], dtype=torch.float16)}

    merged = weighted_mean([(a, 1), (b, 1)])

    assert merged["encoder.w"].dtype == torch.float16
    assert torch.equal(merged["encoder.w"], torch.tensor([1.5, 4.0], dtype=torch.float16))


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_check_update_rejects_non_finite_values_naming_the_key(bert_state, bad_value):
    update = dict(bert_state)
    key = "encoder.encoder.layer.1.output.dense.weight"
    update[key] = bert_state[key].clone()
    update[key][3, 5] = bad_value

    with pytest.raises(UpdateError, match=rf"client-7: key '{key}' has non-finite"):
        check_update(bert_state, update, "client-7")


def test_check_update_rejects_wrong_shape_naming_the_key(bert_state):
    key = "encoder.pooler.dense.bias"
    update = {key: torch.zeros(33)}

    with pytest.raises(UpdateError, match=rf"client-1: key '{key}' has shape \(33,\), expected \(32,\)"):
        check_update(bert_state, update, "client-1")


def test_check_update_rejects_unknown_key_and_empty_update(bert_state):
    with pytest.raises(UpdateError, match=r"client-2: key 'heads.law.weight' is not in the global model"):
        check_update(bert_state, {"heads.law.weight": torch.zeros(2, 32)}, "client-2")
    with pytest.raises(UpdateError, match=r"client-2: empty update"):
        check_update(bert_state, {}, "client-2")


def test_check_update_rejects_int_where_float_expected(bert_state):
    key = "encoder.pooler.dense.bias"

    with pytest.raises(UpdateError, match=rf"client-3: key '{key}' has dtype torch.int64"):
        check_update(bert_state, {key: torch.zeros(32, dtype=torch.int64)}, "client-3")


def test_check_update_accepts_finite_numpy_update_whose_sum_overflows(bert_state):
    reference = {"encoder.w": torch.zeros(4, dtype=torch.float16)}
    big = np.full(4, 60000.0, dtype=np.float16)  # finite, but the float16 sum is inf: the exact test must decide

    check_update(reference, {"encoder.w": big}, "client-4")
    check_update(bert_state, {k: v.numpy() for k, v in bert_state.items()}, "client-4")


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan"), float("inf")])
def test_weight_must_be_positive_and_finite(weight):
    mean = StreamingMean()

    with pytest.raises(ValueError, match="weight must be finite and > 0"):
        mean.add({"encoder.w": torch.ones(2)}, weight)
    assert mean.num_states == 0


def test_integer_buffers_pass_through_and_must_agree():
    ids = torch.arange(8).unsqueeze(0)
    mean = StreamingMean()
    mean.add({"encoder.position_ids": ids, "encoder.w": torch.ones(2)}, 1.0)
    mean.add({"encoder.position_ids": ids.clone(), "encoder.w": torch.full((2,), 3.0)}, 1.0)
    shifted = {"encoder.w": torch.full((2,), 100.0), "encoder.position_ids": ids + 1}

    with pytest.raises(UpdateError, match=r"state #2: integer tensor 'encoder.position_ids' differs"):
        mean.add(shifted, 1.0)
    merged = mean.result()

    assert mean.num_states == 2
    assert merged["encoder.position_ids"].dtype == torch.int64
    assert torch.equal(merged["encoder.position_ids"], ids)
    assert torch.equal(merged["encoder.w"], torch.full((2,), 2.0))  # the rejected state left no trace


def test_shape_change_between_clients_is_rejected():
    mean = StreamingMean()
    mean.add({"heads.bio.weight": torch.ones(2, 4)}, 1.0)

    with pytest.raises(UpdateError, match=r"state #1: key 'heads.bio.weight' has shape \(3, 4\)"):
        mean.add({"heads.bio.weight": torch.ones(3, 4)}, 1.0)


def test_result_is_taken_once_and_needs_a_state():
    with pytest.raises(ValueError, match="no states"):
        weighted_mean([])
    mean = StreamingMean()
    mean.add({"encoder.w": torch.ones(2)}, 2.0)
    mean.result()

    with pytest.raises(RuntimeError, match="already taken"):
        mean.add({"encoder.w": torch.ones(2)}, 1.0)
