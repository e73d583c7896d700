"""Tests for fl.experts.onnx_bert: a tiny BertModel laid out as torch.onnx exports it, converted back exactly."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel

from fl.experts.onnx_bert import ConversionError, bert_config_sizes, bert_state_from_onnx, matmul_scopes

PREFIX = "model.0.auto_model."  # sentence-transformers' module path, as in paraphrase-MiniLM-L3-v2.onnx
SCOPE = "/model/model.0/auto_model/"
CONFIG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100)


@dataclass
class Node:
    op_type: str
    name: str
    input: list[str]


def _model() -> BertModel:
    torch.manual_seed(0)
    return BertModel(BertConfig(**CONFIG), add_pooling_layer=False).eval()


def _export(model: BertModel) -> tuple[dict[str, np.ndarray], list[Node]]:
    """Initializers and nodes named as in the real file: Linear weights anonymous, transposed, fed to a MatMul."""
    initializers, nodes = {}, []
    activation = "/embeddings/LayerNorm/LayerNormalization_output_0"
    for number, (key, value) in enumerate(model.state_dict().items(), start=470):
        module, _, kind = key.rpartition(".")
        if kind == "weight" and value.dim() == 2 and "embeddings" not in key:
            name = f"onnx::MatMul_{number}"
            initializers[name] = value.numpy().T.copy()
            scope = module.replace(".", "/").replace("layer/", "layer.")  # encoder/layer.0/attention/self/query
            nodes.append(Node("MatMul", f"{SCOPE}{scope}/MatMul", [activation, name]))
        else:
            initializers[PREFIX + key] = value.numpy().copy()
    for layer in range(CONFIG["num_hidden_layers"]):  # attention scores: a MatMul of two activations
        nodes.append(Node("MatMul", f"{SCOPE}encoder/layer.{layer}/attention/self/MatMul", ["q", "k"]))
    return initializers, nodes


def _convert(initializers: dict[str, np.ndarray], nodes: list[Node]) -> dict[str, torch.Tensor]:
    targets = {key: tuple(value.shape) for key, value in _model().state_dict().items()}
    return bert_state_from_onnx(initializers, matmul_scopes(nodes, initializers), targets)


def test_round_trip_is_exact() -> None:
    original = _model()
    for parameter in original.parameters():  # no LayerNorm left at ones, no bias at zeros
        parameter.data.add_(0.05 * torch.randn_like(parameter))
    initializers, nodes = _export(original)

    state = _convert(initializers, nodes)
    restored = BertModel(BertConfig(**CONFIG), add_pooling_layer=False).eval()
    restored.load_state_dict(state, strict=True)

    assert state.keys() == original.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in original.state_dict().items())
    ids = torch.tensor([[2, 7, 41, 99, 3, 0], [2, 5, 3, 0, 0, 0]])
    mask = (ids > 0).long()
    with torch.no_grad():
        assert torch.equal(restored(ids, mask).last_hidden_state, original(ids, mask).last_hidden_state)


def test_config_sizes_from_shapes_and_attention_scale() -> None:
    initializers, _ = _export(_model())

    sizes = bert_config_sizes(initializers, attention_scale=4.0)  # sqrt(32 / 2 heads)

    assert sizes == {**CONFIG, "max_position_embeddings": 512, "type_vocab_size": 2}


def test_unplaceable_initializer_is_refused_by_name() -> None:
    initializers, nodes = _export(_model())
    initializers["onnx::Mul_999"] = np.ones((32,), dtype=np.float32)

    with pytest.raises(ConversionError, match="cannot place initializer onnx::Mul_999"):
        _convert(initializers, nodes)


def test_unfilled_key_is_refused_by_name() -> None:
    initializers, nodes = _export(_model())
    del initializers[PREFIX + "encoder.layer.1.output.LayerNorm.bias"]

    with pytest.raises(ConversionError, match=r"no initializer for BertModel key\(s\) encoder.layer.1.output.LayerNorm.bias$"):
        _convert(initializers, nodes)


def test_untransposed_weight_is_refused_by_shape() -> None:
    initializers, nodes = _export(_model())
    name = next(n.input[1] for n in nodes if n.name.endswith("encoder/layer.0/intermediate/dense/MatMul"))
    initializers[name] = initializers[name].T.copy()

    with pytest.raises(ConversionError, match=f"{name} -> encoder.layer.0.intermediate.dense.weight: shape \\(32, 64\\)"):
        _convert(initializers, nodes)
