"""Permutation-aligned averaging of transformer encoders (Git Re-Basin weight matching).

Implements weight matching from Ainsworth, Hayase & Srinivasa, "Git Re-Basin: Merging Models modulo
Permutation Symmetries" (ICLR 2023, arXiv:2209.04836), made exact for BERT-style encoders: before two
fine-tuned encoders are averaged, the hidden units of one are permuted so that they line up with the
other's, which leaves the function it computes unchanged.

A model's symmetries are data. A ``PermutationSpec`` maps each permutation to the (parameter key,
axis) pairs it acts on (the paper's ``axes_to_perm``), plus which pairs of permutations must keep
attention heads whole. It is derived from state-dict key names by a small table per architecture
family, so ``apply_permutation`` and ``match_weights`` know nothing about architectures.

Symmetries of one encoder layer, all exact:

* FFN units: rows (and bias) of the first FFN projection with the columns of the second.
* Attention heads: whole heads move as blocks, and inside each head one permutation of the query/key
  dimensions (q and k rows: ``q_h k_h^T`` is unchanged) and another of the value dimensions (v rows
  with the matching out-projection columns). Each is stored composed into one permutation of the
  hidden axis (``{layer}.attn.qk`` and ``{layer}.attn.vo``); the two must move heads identically.
* Optionally the residual stream: one permutation of the hidden axis shared by the embeddings, every
  LayerNorm, every projection reading the stream (columns) or writing it (rows), the pooler's input
  columns and the domain heads (``heads.<domain>.weight`` columns; the heads read the mean-pooled last
  hidden state). The last hidden state then comes out permuted along its hidden axis; pooler outputs
  and head logits do not change.

Permutations use the gather convention: permuting axis ``i`` of ``w`` by ``p`` gives
``w.index_select(i, p)``, so ``p[j]`` is the unit of the old tensor that lands at position ``j``.
Functions here are pure maps over ``dict[str, torch.Tensor]``; the state-dict convention is
``<prefix><Hugging Face key>`` for the encoder and ``heads.<domain>.{weight,bias}`` for the heads.
"""

from __future__ import annotations

import logging
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from strategies.aggregation import StreamingMean
from strategies.update import Clients, MergeContext

_LOG = logging.getLogger(__name__)

RESIDUAL = "residual"
Axis = tuple[str, int]
State = Mapping[str, Tensor]

_HEAD_WEIGHT = re.compile(r"heads\..+\.weight")
# An assignment counts as better only past this relative margin, so ties never flip-flop.
_IMPROVE_RTOL = 1e-9


@dataclass(frozen=True)
class HeadGroup:
    """Two hidden-axis permutations of one attention layer that must move whole heads identically."""

    qk: str  # permutation of the query/key output units
    vo: str  # permutation of the value units and the out-projection's input columns
    num_heads: int


@dataclass(frozen=True)
class PermutationSpec:
    """Which (parameter key, axis) pairs each permutation acts on, and which pairs form attention heads."""

    perm_to_axes: Mapping[str, tuple[Axis, ...]]
    head_groups: Mapping[str, HeadGroup] = field(default_factory=dict)

    def __post_init__(self) -> None:
        owner: dict[Axis, str] = {}
        for name, axes in self.perm_to_axes.items():
            if not axes:
                raise ValueError(f"permutation {name!r} acts on no parameter")
            for axis in axes:
                if axis in owner:
                    raise ValueError(f"{axis} is claimed by both {owner[axis]!r} and {name!r}")
                owner[axis] = name
        for group_name, group in self.head_groups.items():
            for name in (group.qk, group.vo):
                if name not in self.perm_to_axes:
                    raise ValueError(f"head group {group_name!r} names unknown permutation {name!r}")

    @cached_property
    def axes_to_perm(self) -> dict[str, dict[int, str]]:
        """For each parameter key, the permutation acting on each of its permuted axes."""
        table: dict[str, dict[int, str]] = defaultdict(dict)
        for name, axes in self.perm_to_axes.items():
            for key, axis in axes:
                table[key][axis] = name
        return dict(table)

    @cached_property
    def blocks(self) -> tuple[tuple[str, ...], ...]:
        """Units of coordinate descent: each head group's (qk, vo) pair, then every other permutation."""
        grouped = tuple((group.qk, group.vo) for group in self.head_groups.values())
        in_groups = {name for pair in grouped for name in pair}
        return grouped + tuple((name,) for name in self.perm_to_axes if name not in in_groups)


# --- architecture tables: parameter suffix -> role of each axis --------------------------------------
# Roles: "res" residual stream, "ffn" FFN units, "attn.qk" / "attn.vo" head-structured units, None fixed.

_Roles = tuple[str | None, ...]


@dataclass(frozen=True)
class _Family:
    name: str
    layer_prefix: str  # layer keys are "<layer_prefix><index>.<suffix>"
    layer: Mapping[str, _Roles]
    other: Mapping[str, _Roles]


def _linear(out_role: str | None, in_role: str | None) -> dict[str, _Roles]:
    return {"weight": (out_role, in_role), "bias": (out_role,)}


def _table(modules: Mapping[str, Mapping[str, _Roles]]) -> dict[str, _Roles]:
    return {f"{module}.{param}": roles for module, params in modules.items() for param, roles in params.items()}


_LAYER_NORM = {"weight": ("res",), "bias": ("res",)}
_EMBEDDING = {"weight": (None, "res")}

_BERT = _Family(
    name="BertModel/RobertaModel",
    layer_prefix="encoder.layer.",
    layer=_table({
        "attention.self.query": _linear("attn.qk", "res"),
        "attention.self.key": _linear("attn.qk", "res"),
        "attention.self.value": _linear("attn.vo", "res"),
        "attention.output.dense": _linear("res", "attn.vo"),
        "attention.output.LayerNorm": _LAYER_NORM,
        "intermediate.dense": _linear("ffn", "res"),
        "output.dense": _linear("res", "ffn"),
        "output.LayerNorm": _LAYER_NORM,
    }),
    other=_table({
        "embeddings.word_embeddings": _EMBEDDING,
        "embeddings.position_embeddings": _EMBEDDING,
        "embeddings.token_type_embeddings": _EMBEDDING,
        "embeddings.LayerNorm": _LAYER_NORM,
        "pooler.dense": _linear(None, "res"),
    }),
)

_DISTILBERT = _Family(
    name="DistilBertModel",
    layer_prefix="transformer.layer.",
    layer=_table({
        "attention.q_lin": _linear("attn.qk", "res"),
        "attention.k_lin": _linear("attn.qk", "res"),
        "attention.v_lin": _linear("attn.vo", "res"),
        "attention.out_lin": _linear("res", "attn.vo"),
        "sa_layer_norm": _LAYER_NORM,
        "ffn.lin1": _linear("ffn", "res"),
        "ffn.lin2": _linear("res", "ffn"),
        "output_layer_norm": _LAYER_NORM,
    }),
    other=_table({
        "embeddings.word_embeddings": _EMBEDDING,
        "embeddings.position_embeddings": _EMBEDDING,
        "embeddings.LayerNorm": _LAYER_NORM,
    }),
)

_FAMILIES = (_BERT, _DISTILBERT)


def _detect_family(keys: Sequence[str], prefix: str) -> _Family:
    for family in _FAMILIES:
        pattern = re.compile(re.escape(family.layer_prefix) + r"\d+\.(.+)")
        if any((m := pattern.fullmatch(key)) and m.group(1) in family.layer for key in keys):
            return family
    known = ", ".join(family.name for family in _FAMILIES)
    seen = ", ".join(prefix + key for key in keys[:4]) or "none"
    raise ValueError(
        f"unknown encoder architecture under prefix {prefix!r}: no {known} layer layout found "
        f"(first float keys: {seen})"
    )


def _axis_roles(family: _Family, key: str, full_key: str) -> tuple[_Roles, str]:
    """The role of each axis of one encoder parameter, and the permutation-name prefix of its layer."""
    if key in family.other:
        return family.other[key], ""
    match = re.fullmatch(re.escape(family.layer_prefix) + r"(\d+)\.(.+)", key)
    if match is None or match.group(2) not in family.layer:
        raise ValueError(f"parameter {full_key!r} is not part of the {family.name} layout; cannot permute it safely")
    return family.layer[match.group(2)], f"layer.{match.group(1)}."


def permutation_spec(
    state: State, num_attention_heads: int, residual: bool = False, prefix: str = "encoder."
) -> PermutationSpec:
    """Derive the permutation symmetries of the encoder in ``state`` from its key names.

    Every floating-point tensor under ``prefix`` must belong to a recognised layout (BERT/RoBERTa or
    DistilBERT), so a parameter the table does not know cannot be silently left out of a symmetry.
    With ``residual`` the residual stream is permuted too, including every ``heads.*.weight``.
    """
    float_keys = [key for key, tensor in state.items() if tensor.is_floating_point()]
    encoder_keys = [key for key in float_keys if key.startswith(prefix) and not _HEAD_WEIGHT.fullmatch(key)]
    family = _detect_family([key[len(prefix):] for key in encoder_keys], prefix)

    axes: dict[str, list[Axis]] = defaultdict(list)
    for full_key in encoder_keys:
        roles, layer = _axis_roles(family, full_key[len(prefix):], full_key)
        if len(roles) != state[full_key].ndim:
            raise ValueError(f"parameter {full_key!r} has {state[full_key].ndim} axes, expected {len(roles)}")
        for axis, role in enumerate(roles):
            if role == "res" and residual:
                axes[RESIDUAL].append((full_key, axis))
            elif role not in (None, "res"):
                axes[layer + role].append((full_key, axis))
    if residual:
        axes[RESIDUAL].extend((key, 1) for key in float_keys if _HEAD_WEIGHT.fullmatch(key))

    for name, pairs in axes.items():
        sizes = {state[key].shape[axis] for key, axis in pairs}
        if len(sizes) != 1:
            raise ValueError(f"permutation {name!r} acts on axes of different sizes {sorted(sizes)}: {pairs}")

    head_groups = {}
    for name in axes:
        if name.endswith(".attn.qk"):
            group_name = name.removesuffix(".qk")
            group = HeadGroup(qk=name, vo=group_name + ".vo", num_heads=num_attention_heads)
            size = state[axes[name][0][0]].shape[axes[name][0][1]]
            if group.vo not in axes or size % num_attention_heads:
                raise ValueError(
                    f"{group_name!r}: attention of width {size} cannot be split into {num_attention_heads} heads"
                )
            head_groups[group_name] = group
    return PermutationSpec({name: tuple(pairs) for name, pairs in axes.items()}, head_groups)


# --- applying and drawing permutations ---------------------------------------------------------------


def _perm_sizes(spec: PermutationSpec, *states: State) -> dict[str, int]:
    """Units of each permutation, read from its first parameter present in all ``states``.

    States may lack spec keys (a client sends only its own domain's head); each permutation must
    still act on at least one parameter they share.
    """
    sizes = {}
    for name, axes in spec.perm_to_axes.items():
        shared = [(key, axis) for key, axis in axes if all(key in state for state in states)]
        if not shared:
            raise ValueError(f"permutation {name!r} acts on no parameter present in the state(s)")
        key, axis = shared[0]
        sizes[name] = states[0][key].shape[axis]
    return sizes


def _permute(w: Tensor, axis_perms: Mapping[int, str], perms: Mapping[str, Tensor], skip: int | None = None) -> Tensor:
    for axis, name in axis_perms.items():
        if axis != skip:
            w = w.index_select(axis, perms[name])
    return w


def _check_perms(spec: PermutationSpec, state: State, perms: Mapping[str, Tensor]) -> None:
    """Fail before any work if ``perms`` are not valid permutations respecting the head structure."""
    sizes = _perm_sizes(spec, state)
    if RESIDUAL in sizes:
        unknown = [key for key in state if _HEAD_WEIGHT.fullmatch(key) and key not in spec.axes_to_perm]
        if unknown:
            raise ValueError(f"the spec does not permute {unknown}: build it from a state holding every head")
    if set(perms) != set(sizes):
        raise ValueError(f"permutations {sorted(perms)} do not match the spec's {sorted(sizes)}")
    for name, n in sizes.items():
        if perms[name].dtype != torch.long or not torch.equal(perms[name].sort().values, torch.arange(n)):
            raise ValueError(f"{name!r} is not a permutation of {n} units (LongTensor expected)")
    for group_name, group in spec.head_groups.items():
        heads = [perms[name].view(group.num_heads, -1) // (sizes[name] // group.num_heads) for name in (group.qk, group.vo)]
        whole = all(bool((h == h[:, :1]).all()) for h in heads)
        if not whole or not torch.equal(heads[0][:, 0], heads[1][:, 0]):
            raise ValueError(f"{group_name!r}: query/key and value permutations must move the same whole heads")


def apply_permutation(state: State, spec: PermutationSpec, perms: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Return a new state with every spec axis permuted; tensors outside the spec are shared, not copied."""
    _check_perms(spec, state, perms)
    return {key: _permute(w, spec.axes_to_perm.get(key, {}), perms) for key, w in state.items()}


def random_permutation(
    spec: PermutationSpec, state: State, generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """Draw a uniformly random valid permutation: heads as blocks with their own within-head orders."""
    sizes = _perm_sizes(spec, state)
    perms = {name: torch.randperm(n, generator=generator) for name, n in sizes.items()}
    for group in spec.head_groups.values():
        head_dim = sizes[group.qk] // group.num_heads
        heads = torch.randperm(group.num_heads, generator=generator)
        for name in (group.qk, group.vo):
            within = torch.rand(group.num_heads, head_dim, generator=generator).argsort(dim=1)
            perms[name] = (heads[:, None] * head_dim + within).reshape(-1)
    return perms


# --- weight matching ------------------------------------------------------------------------------


def _rows(w: Tensor, axis: int) -> Tensor:
    """``w`` as a matrix with one row per unit of ``axis`` (a view for 1-D and 2-D tensors)."""
    return w.movedim(axis, 0).reshape(w.shape[axis], -1)


def _row_maxima(costs: Tensor) -> tuple[Tensor, Tensor]:
    """Row-wise argmax of each square matrix in ``[..., n, n]``, and whether it is a permutation.

    When it is, that assignment reaches the upper bound ``sum_i max_j cost[i, j]`` and is optimal.
    """
    best = costs.argmax(dim=-1)
    return best, (best.sort(dim=-1).values == torch.arange(costs.shape[-1])).all(dim=-1)


def _assign(costs: Tensor) -> tuple[Tensor, Tensor]:
    """For square cost matrices ``[..., n, n]``: the permutations maximising ``sum_i cost[i, perm[i]]``
    and their values (float64). The O(n^3) solver runs only where the row maxima do not already
    form a permutation (rare once two models are nearly aligned).
    """
    n = costs.shape[-1]
    flat = costs.reshape(-1, n, n)
    best, optimal = _row_maxima(flat)
    for index in optimal.logical_not().nonzero().flatten().tolist():
        _, cols = linear_sum_assignment(flat[index].double().numpy(), maximize=True)
        best[index] = torch.from_numpy(cols)
    values = flat.gather(-1, best[..., None]).double().sum(dim=(-2, -1))
    return best.view(costs.shape[:-1]), values.view(costs.shape[:-2])


def _value(cost: Tensor, perm: Tensor) -> float:
    return float(cost.gather(1, perm[:, None]).double().sum())


def _match_heads(cost_qk: Tensor, cost_vo: Tensor, num_heads: int) -> tuple[Tensor, Tensor]:
    """Best head-structured (qk, vo) permutations for fixed cost matrices, exactly.

    The objective splits over pairs (head a of the reference, head b of the other model): pairing them
    scores the best within-head query/key matching of block (a, b) of ``cost_qk`` plus the best
    within-head value matching of block (a, b) of ``cost_vo``, and the within-head choices of
    different pairs are independent. So the joint optimum over head order and within-head orders is
    a head-level assignment on these pair scores followed by the within-head solutions of the chosen
    pairs. The pair scores cost two small assignment problems per pair; they are skipped when the
    head assignment on their upper bounds (sums of row maxima) picks only pairs whose row maxima form
    permutations, since that assignment then attains the bound and no other can beat it.
    """
    head_dim = cost_qk.shape[0] // num_heads
    blocks = torch.stack([cost_qk, cost_vo]).view(2, num_heads, head_dim, num_heads, head_dim).transpose(2, 3)
    rows = torch.arange(num_heads)
    within, optimal = _row_maxima(blocks)  # [2, H, H, d] and [2, H, H]
    heads, _ = _assign(blocks.amax(dim=-1).double().sum(dim=(0, -1)))
    if not optimal[:, rows, heads].all():
        within, scores = _assign(blocks)
        heads, _ = _assign(scores.sum(dim=0))
    perm_qk, perm_vo = (heads[:, None] * head_dim + within[:, rows, heads]).reshape(2, -1)
    return perm_qk, perm_vo


class _CostModel:
    """Builds each permutation's matching cost ``sum over its (key, axis) of A_k @ permuted(B_k)^T``.

    Terms are grouped by the permutations acting on their keys' other axes, one matmul per tensor.
    A group with none (embeddings, biases, LayerNorms, heads) never changes and is summed once. When
    a permutation's terms depend on several others (the residual stream), each group's sum is kept
    and recomputed only after one of its permutations changed.
    """

    def __init__(self, spec: PermutationSpec, reference: State, other: State) -> None:
        self.spec, self.reference, self.other = spec, reference, other
        self.groups: dict[str, dict[frozenset[str], list[Axis]]] = {}
        for name, axes in spec.perm_to_axes.items():
            groups: dict[frozenset[str], list[Axis]] = defaultdict(list)
            for key, axis in axes:
                groups[frozenset(p for a, p in spec.axes_to_perm[key].items() if a != axis)].append((key, axis))
            self.groups[name] = dict(groups)
        self._kept: dict[tuple[str, frozenset[str]], tuple[tuple[int, ...], Tensor]] = {}

    def _sum(self, terms: Sequence[Axis], perms: Mapping[str, Tensor]) -> Tensor:
        total = None
        for key, axis in terms:
            a = _rows(self.reference[key], axis)
            b = _rows(_permute(self.other[key], self.spec.axes_to_perm[key], perms, skip=axis), axis)
            total = a @ b.T if total is None else total.addmm_(a, b.T)
        return total

    def cost(self, name: str, perms: Mapping[str, Tensor], changed_at: Mapping[str, int]) -> Tensor:
        """The cost of ``name`` given the other permutations; ``changed_at`` dates their last change."""
        groups = self.groups[name]
        keep_all = sum(1 for deps in groups if deps) > 1
        fresh, kept = [], []
        for deps, terms in groups.items():
            if deps and not keep_all:
                fresh.append(self._sum(terms, perms))
                continue
            stamp = tuple(changed_at[dep] for dep in sorted(deps))
            entry = self._kept.get((name, deps))
            if entry is None or entry[0] != stamp:
                entry = self._kept[(name, deps)] = (stamp, self._sum(terms, perms))
            kept.append(entry[1])
        total = fresh[0] if fresh else kept.pop().clone()  # never add into a kept sum
        for part in fresh[1:] + kept:
            total += part
        return total

    def dependencies(self, block: Sequence[str]) -> frozenset[str]:
        """Permutations whose change alters the cost of ``block``."""
        return frozenset().union(*(deps for name in block for deps in self.groups[name]))


def _shared(spec: PermutationSpec, reference: State, other: State) -> PermutationSpec:
    """The spec restricted to parameters both states hold, after checking that their shapes agree."""
    for key in spec.axes_to_perm:
        if key in reference and key in other and reference[key].shape != other[key].shape:
            raise ValueError(f"parameter {key!r} has shapes {tuple(reference[key].shape)} and {tuple(other[key].shape)}")
    _perm_sizes(spec, reference, other)
    perm_to_axes = {
        name: tuple((key, axis) for key, axis in axes if key in reference and key in other)
        for name, axes in spec.perm_to_axes.items()
    }
    return PermutationSpec(perm_to_axes, spec.head_groups)


def match_weights(
    reference: State, other: State, spec: PermutationSpec, max_iter: int = 100, seed: int = 0
) -> dict[str, Tensor]:
    """Permutations aligning ``other`` to ``reference`` (apply them to ``other``), by weight matching.

    Coordinate descent as in Git Re-Basin (Algorithm 1): start from the identity; each sweep visits
    the blocks (a head group's qk/vo pair, or one other permutation) in a random order and replaces
    a block by the assignment maximising ``sum <reference, permuted other>`` given all the others;
    stop after a sweep in which nothing improves. Two departures, neither changing what a sweep
    optimises: a block whose cost inputs have not changed since it was last solved cannot improve
    and is skipped; and within each sweep the random order is stably sorted so that blocks others
    depend on come first. Every layer block depends on the residual stream and on nothing else, so
    solving it first means no layer block is solved against the stream's arbitrary initial order
    only to be solved again (on a bert-base pair that halved the work). Without the residual stream
    no block depends on another and the order stays fully random.
    """
    spec = _shared(spec, reference, other)
    keys = spec.axes_to_perm
    model = _CostModel(spec, {k: reference[k].float() for k in keys}, {k: other[k].float() for k in keys})
    perms = {name: torch.arange(n) for name, n in _perm_sizes(spec, reference).items()}
    num_heads = {(group.qk, group.vo): group.num_heads for group in spec.head_groups.values()}
    dependencies = {block: model.dependencies(block) for block in spec.blocks}
    dependents = Counter(name for deps in dependencies.values() for name in deps)
    precedence = [-sum(dependents[name] for name in block) for block in spec.blocks]
    changed_at = dict.fromkeys(perms, -1)
    solved_at: dict[tuple[str, ...], int] = {}
    rng = np.random.default_rng(seed)
    step = sweeps = 0
    converged = False
    while sweeps < max_iter and not converged:
        sweeps += 1
        converged = True
        for index in sorted(rng.permutation(len(spec.blocks)), key=precedence.__getitem__):
            block = spec.blocks[index]
            if block in solved_at and all(changed_at[name] < solved_at[block] for name in dependencies[block]):
                continue
            step += 1
            solved_at[block] = step
            costs = [model.cost(name, perms, changed_at) for name in block]
            proposal = _match_heads(*costs, num_heads[block]) if block in num_heads else (_assign(costs[0])[0],)
            old = sum(_value(cost, perms[name]) for cost, name in zip(costs, block))
            new = sum(_value(cost, perm) for cost, perm in zip(costs, proposal))
            if new > old + _IMPROVE_RTOL * max(1.0, abs(old)):
                perms.update(zip(block, proposal))
                changed_at.update(dict.fromkeys(block, step))
                converged = False
    log = _LOG.info if converged else _LOG.warning
    log("weight matching: %d sweeps, %d block solves, converged=%s", sweeps, step, converged)
    return perms


# --- aligned averaging --------------------------------------------------------------------------


@dataclass(frozen=True)
class Alignment:
    """A state permuted to line up with a reference, and how many of each permutation's units moved."""

    state: dict[str, Tensor]
    moved: dict[str, int]
    units: dict[str, int]


def align_to(reference: State, state: State, spec: PermutationSpec, seed: int = 0) -> Alignment:
    """``state`` weight-matched to ``reference`` and permuted accordingly (its function unchanged)."""
    perms = match_weights(reference, state, spec, seed=seed)
    moved = {name: int((p != torch.arange(len(p))).sum()) for name, p in perms.items()}
    return Alignment(apply_permutation(state, spec, perms), moved, {name: len(p) for name, p in perms.items()})


def aligned(global_state: State, clients: Clients, context: MergeContext, *, residual: bool) -> dict[str, Tensor]:
    """FedAvg of the clients after aligning each to the global state (the only align-then-average).

    Clients hold different heads (each its own domain's): each is permuted with its own encoder, and the
    key-wise mean averages every key over the clients that sent it. How many units each client's alignment
    moved is noted per client (near 0 for fine-tunes of the global model, most units for independent runs).
    """
    if context.num_heads is None:
        raise ValueError("the aligned rule needs the number of attention heads (MergeContext.num_heads)")
    spec = permutation_spec(global_state, context.num_heads, residual=residual)
    mean = StreamingMean()
    for client in clients:
        alignment = align_to(global_state, client.state, spec, seed=context.server_round)
        moved = sum(alignment.moved.values())
        context.notes.setdefault(client.name, {})["moved-units"] = moved
        _LOG.info("aligned: round %d %s: %d units moved", context.server_round, client.name, moved)
        mean.add(alignment.state, client.weight)
    return mean.result()
