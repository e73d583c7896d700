"""What two or more experts share, checked before anything is merged: the answer to "can these be merged?".

Weight merges need the same architecture and parameter shapes (after the vocabulary remap, which only
changes the input embedding's rows) and mean something only when the experts share an initialisation. The
report says which holds: config fields and parameter shapes that differ, vocabulary overlap (identical
tokens at identical ids, tokens shared at other ids, tokens only in one), each expert's distance to
``--base``, and how many hidden units weight matching (Git Re-Basin) moves to line each expert up with the
first: near zero for fine-tunes of one base, most units for independent runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fl.experts.loading import Predictor
from fl.experts.vocabulary import Overlap, input_embedding_key, overlap
from strategies.permutation import align_to, permutation_spec

# Config fields that say nothing about whether weights line up (names, labels, runtime switches).
IGNORED_FIELDS = frozenset({
    "architectures", "id2label", "label2id", "transformers_version", "torch_dtype", "dtype", "finetuning_task",
    "problem_type", "gradient_checkpointing", "use_cache", "classifier_dropout", "output_attentions",
    "output_hidden_states", "return_dict", "vocab_size", "tokenizer_class", "model_name",
})
# What makes weights impossible to merge, in the order a refusal names it.
BLOCKING_FIELDS = (("model_type", "architecture"), ("hidden_size", "hidden size"), ("num_hidden_layers", "layers"),
                   ("num_attention_heads", "attention heads"), ("intermediate_size", "FFN width"))


@dataclass(frozen=True)
class Compatibility:
    names: tuple[str, ...]
    config_differences: dict[str, tuple[object, ...]]  # field -> value per expert
    shape_differences: dict[str, tuple[tuple[int, ...] | None, ...]]  # key -> shape per expert (None: absent), input embedding rows aside
    vocabulary: tuple[Overlap, ...]  # each expert after the first against the first
    base_distance: dict[str, float]  # relative L2 distance of each expert's shared weights to --base (empty without it)
    moved_units: dict[str, tuple[int, int]]  # expert after the first -> (units weight matching moved, units)
    base_blocker: str = ""  # why --base cannot be merged with the experts ('' when it can, or no base)

    @property
    def blocker(self) -> str:
        """Why the experts' weights cannot be merged, in one phrase ('' when they can)."""
        for name, phrase in BLOCKING_FIELDS:
            if name in self.config_differences:
                values = " vs ".join(str(v) for v in self.config_differences[name])
                return f"{phrase} {values}"
        for key, shapes in self.shape_differences.items():
            if all(s is not None for s in shapes):
                return f"parameter {key} has shapes {' vs '.join(str(tuple(s)) for s in shapes)}"
        return ""

    @property
    def same_vocabulary(self) -> bool:
        return all(v.identical for v in self.vocabulary)

    def lines(self) -> list[str]:
        """The short table printed before any scoring, one property per row."""
        rows = [("experts", ", ".join(self.names))]
        if self.config_differences:
            rows += [(f"config {k}", " vs ".join(str(v) for v in vs)) for k, vs in self.config_differences.items()]
        else:
            rows.append(("config", "identical (names, labels and runtime switches aside)"))
        absent = [k for k, shapes in self.shape_differences.items() if any(s is None for s in shapes)]
        differing = len(self.shape_differences) - len(absent)
        rows.append(("parameter shapes", f"{differing} keys differ in shape, {len(absent)} present in only some experts" if self.shape_differences else "identical"))
        for name, v in zip(self.names[1:], self.vocabulary):
            rows.append((
                f"vocabulary {self.names[0]} / {name}",
                "identical" if v.identical else
                f"{v.same_id} same token same id, {v.other_id} shared at other ids, {v.only_first} / {v.only_second} only in one; shared {100 * v.shared_fraction:.2f}%",
            ))
        rows += [(f"distance to base: {n}", f"{self.base_distance[n]:.4f} (relative L2)" if n in self.base_distance else "none: not the base's shapes")
                 for n in (self.names if self.base_distance or self.base_blocker else ())]
        if self.base_blocker:
            rows.append(("base", f"cannot be merged with the experts: {self.base_blocker}"))
        rows += [(f"weight matching {self.names[0]} <- {n}", f"{m} of {u} units moved ({100 * m / max(u, 1):.1f}%)") for n, (m, u) in self.moved_units.items()]
        rows.append(("weight merges", f"refused: {self.blocker}" if self.blocker else "possible"))
        width = max(len(k) for k, _ in rows)
        return [f"  {k.ljust(width)}  {v}" for k, v in rows]

    def record(self) -> dict[str, object]:
        return {
            "experts": list(self.names),
            "config-differences": {k: list(map(str, v)) for k, v in self.config_differences.items()},
            "shape-differences": {k: [list(s) if s is not None else None for s in v] for k, v in self.shape_differences.items()},
            "vocabulary": [
                {"expert": n, "same-id": v.same_id, "other-id": v.other_id, "only-first": v.only_first, "only-second": v.only_second,
                 "shared-fraction": v.shared_fraction, "identical": v.identical}
                for n, v in zip(self.names[1:], self.vocabulary)
            ],
            "distance-to-base": self.base_distance,
            "moved-units": {n: {"moved": m, "units": u} for n, (m, u) in self.moved_units.items()},
            "weight-merge-blocker": self.blocker,
            "base-blocker": self.base_blocker,
        }


def config_differences(configs: Sequence[Mapping[str, object]]) -> dict[str, tuple[object, ...]]:
    fields = sorted({k for c in configs for k in c if not k.startswith("_") and k not in IGNORED_FIELDS})
    return {k: tuple(c.get(k) for c in configs) for k in fields if len({repr(c.get(k)) for c in configs}) > 1}


def shape_differences(states: Sequence[Mapping[str, torch.Tensor]], embedding_key: str) -> dict[str, tuple[tuple[int, ...] | None, ...]]:
    """Keys whose shape differs or that some state lacks; the input embedding counts only if its width differs."""
    keys = sorted({k for s in states for k in s})
    found = {}
    for key in keys:
        shapes = tuple(tuple(s[key].shape) if key in s else None for s in states)
        if key == embedding_key and all(s is not None for s in shapes):
            shapes_compared = {s[1:] for s in shapes}
        else:
            shapes_compared = set(shapes)
        if len(shapes_compared) > 1:
            found[key] = shapes
    return found


def relative_distance(state: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], skip: str) -> float:
    """||state - base|| / ||base|| over the floating keys both hold with one shape (`skip` left out)."""
    num = den = 0.0
    for key, value in state.items():
        if key == skip or key not in base or base[key].shape != value.shape or not value.is_floating_point():
            continue
        num += float((value.double() - base[key].double()).pow(2).sum())
        den += float(base[key].double().pow(2).sum())
    return (num / den) ** 0.5 if den else float("nan")


def moved_units(reference: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor], num_heads: int, seed: int) -> tuple[int, int]:
    """How many hidden units weight matching moves to line `other` up with `reference` (prefixed encoder states
    of one shape), over every permutation of the residual stream, heads and FFN units."""
    reference, other = ({k: v for k, v in s.items() if k.startswith("encoder.")} for s in (reference, other))
    spec = permutation_spec(reference, num_heads, residual=True)
    alignment = align_to(reference, other, spec, seed=seed)
    return sum(alignment.moved.values()), sum(alignment.units.values())


def pair_blocker(a: Predictor, a_state: Mapping[str, torch.Tensor], b: Predictor, b_state: Mapping[str, torch.Tensor], embedding: str) -> str:
    """Why the weights of two models cannot be merged ('' when they can)."""
    return Compatibility((a.name, b.name), config_differences([a.config.to_dict(), b.config.to_dict()]),
                         shape_differences([a_state, b_state], embedding), (), {}, {}).blocker


def compatibility(experts: Sequence[Predictor], base: Predictor | None) -> Compatibility:
    """The report for `experts` (and `base`), weight matching aside: it needs the experts' encoders in one
    vocabulary (fl.experts.merge.prepare), so the caller adds ``moved_units`` once it has them."""
    names = tuple(e.name for e in experts)
    states = [e.body_state() for e in experts]
    embedding = input_embedding_key(experts[0].body)
    base_distance: dict[str, float] = {}
    base_blocker = ""
    if base is not None:
        base_state = base.body_state()
        base_blocker = pair_blocker(base, base_state, experts[0], states[0], embedding)
        base_vocab = base.tokenizer.get_vocab()
        for expert, state in zip(experts, states):  # only experts of the base's shapes have a distance to it
            if not pair_blocker(base, base_state, expert, state, embedding):
                skip = "" if expert.tokenizer.get_vocab() == base_vocab else embedding
                base_distance[expert.name] = relative_distance(state, base_state, skip)
    return Compatibility(
        names,
        config_differences([e.config.to_dict() for e in experts]),
        shape_differences(states, embedding),
        tuple(overlap(experts[0].tokenizer.get_vocab(), e.tokenizer.get_vocab()) for e in experts[1:]),
        base_distance,
        {},
        base_blocker,
    )
