"""Turn a BERT encoder exported to ONNX by ``torch.onnx`` back into a Hugging Face ``BertModel`` state dict.

The exporter keeps the embeddings, biases and LayerNorms under their module names behind one prefix
(``model.0.auto_model.embeddings.word_embeddings.weight`` for a sentence-transformers model), but folds each
Linear weight into an anonymous initializer (``onnx::MatMul_470``) that a MatMul node multiplies by on the
right, stored transposed as (in_features, out_features). That node's name carries the module's scope
(``/model/model.0/auto_model/encoder/layer.0/attention/self/query/MatMul``), so each anonymous weight is placed
by the MatMul that consumes it. The target keys and shapes come from the ``BertModel`` itself (its state dict is
the API), so nothing here lists BERT's layout by hand: every initializer must land on exactly one key of the
right shape and every key must be filled, or the conversion fails naming the tensor. No ``onnx`` import: the
caller reads the file (``sims/prepare_partners.py``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Protocol

import numpy as np
import torch

ANCHOR = "embeddings.word_embeddings.weight"  # the one BERT parameter every export keeps by name


class ConversionError(ValueError):
    """The ONNX graph does not map one to one onto the BertModel's state dict."""


class GraphNode(Protocol):
    """The fields of an ``onnx.NodeProto`` that the conversion reads."""

    op_type: str
    name: str
    input: Sequence[str]


def module_prefix(names: Iterable[str]) -> str:
    """The prefix before ``embeddings.word_embeddings.weight`` shared by the named initializers."""
    found = [name[: -len(ANCHOR)] for name in names if name == ANCHOR or name.endswith("." + ANCHOR)]
    if len(found) != 1:
        raise ConversionError(f"expected one initializer named *{ANCHOR}, found {len(found)}: not one BERT export")
    return found[0]


def matmul_scopes(nodes: Iterable[GraphNode], initializer_names: Collection[str]) -> dict[str, str]:
    """Map each initializer that is the right operand of a MatMul to that node's name (its module scope)."""
    scopes: dict[str, str] = {}
    for node in nodes:
        if node.op_type != "MatMul":
            continue
        left, right = node.input
        if left in initializer_names:
            raise ConversionError(f"initializer {left} is the left operand of MatMul {node.name}: not a weight")
        if right not in initializer_names:
            continue
        if right in scopes:
            raise ConversionError(f"initializer {right} feeds two MatMul nodes ({scopes[right]}, {node.name}): tied weights")
        scopes[right] = node.name
    return scopes


def linear_key(node_name: str, target_shapes: Mapping[str, Sequence[int]]) -> str:
    """The ``*.weight`` key whose module path ends the MatMul node's scope (its name less the op's own name)."""
    scope = node_name.rsplit("/", 1)[0].strip("/").replace("/", ".") + ".weight"
    found = [key for key, shape in target_shapes.items()
             if len(shape) == 2 and key.endswith(".weight") and (scope == key or scope.endswith("." + key))]
    if len(found) != 1:
        raise ConversionError(f"MatMul {node_name} names {len(found)} BertModel weights "
                              f"({', '.join(found) or 'none'}): expected one")
    return found[0]


def bert_state_from_onnx(
    initializers: Mapping[str, np.ndarray],
    scopes: Mapping[str, str],
    target_shapes: Mapping[str, Sequence[int]],
) -> dict[str, torch.Tensor]:
    """Place every initializer on one key of ``target_shapes`` (a BertModel's state dict, key -> shape).

    A named initializer keeps its name less the module prefix; an anonymous one is a MatMul weight, placed by
    ``scopes`` (``matmul_scopes``) and transposed to the (out_features, in_features) layout of ``nn.Linear``.
    Refused, naming the tensor: an initializer that is neither, a key BertModel lacks, a wrong shape, two
    initializers on one key, and any key left unfilled.
    """
    prefix = module_prefix(initializers)
    state: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    for name, array in initializers.items():
        if name.startswith(prefix) and name not in scopes:
            key, value = name[len(prefix):], array
        elif name in scopes:
            key, value = linear_key(scopes[name], target_shapes), array.T
        else:
            raise ConversionError(f"cannot place initializer {name} {tuple(array.shape)}: "
                                  f"neither named under '{prefix}' nor the weight of a MatMul")
        if key not in target_shapes:
            raise ConversionError(f"initializer {name} maps to {key}, which the BertModel does not have")
        if tuple(value.shape) != tuple(target_shapes[key]):
            raise ConversionError(f"initializer {name} -> {key}: shape {tuple(value.shape)}, "
                                  f"the BertModel expects {tuple(target_shapes[key])}")
        if key in source:
            raise ConversionError(f"initializers {source[key]} and {name} both map to {key}")
        source[key] = name
        state[key] = torch.from_numpy(np.array(value, order="C", copy=True))
    missing = sorted(set(target_shapes) - set(state))
    if missing:
        raise ConversionError(f"no initializer for BertModel key(s) {', '.join(missing)}")
    return state


def bert_config_sizes(initializers: Mapping[str, np.ndarray], attention_scale: float) -> dict[str, int]:
    """The BertConfig sizes, read from the initializer shapes; the head count from the attention scale.

    ``attention_scale`` is the constant the attention scores are divided by, sqrt(head size): the one size
    no parameter's shape shows.
    """
    prefix = module_prefix(initializers)

    def shape(key: str) -> tuple[int, ...]:
        if prefix + key not in initializers:
            raise ConversionError(f"no initializer {prefix + key}")
        return tuple(initializers[prefix + key].shape)

    vocab_size, hidden_size = shape("embeddings.word_embeddings.weight")
    pattern = re.compile(re.escape(prefix) + r"encoder\.layer\.(\d+)\.")
    layers = {int(m.group(1)) for name in initializers if (m := pattern.match(name))}
    if not layers or layers != set(range(len(layers))):
        raise ConversionError(f"encoder layers {sorted(layers)}: expected 0 .. n-1")
    head_size = round(attention_scale**2)
    if head_size < 1 or not math.isclose(attention_scale**2, head_size, rel_tol=1e-4) or hidden_size % head_size:
        raise ConversionError(f"attention scale {attention_scale} is not sqrt of a head size dividing {hidden_size}")
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_hidden_layers": len(layers),
        "num_attention_heads": hidden_size // head_size,
        "intermediate_size": shape("encoder.layer.0.intermediate.dense.bias")[0],
        "max_position_embeddings": shape("embeddings.position_embeddings.weight")[0],
        "type_vocab_size": shape("embeddings.token_type_embeddings.weight")[0],
    }
