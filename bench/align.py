"""Time weight matching on a bert-base-sized pair against a port of Git Re-Basin's reference loop.

The second model is a planted random permutation (heads, within-head, FFN and residual stream) of the
first plus small Gaussian noise, so both matchers should recover the planted permutation. The reference
port follows ``weight_matching`` of git-re-basin (Ainsworth et al. 2022, arXiv:2209.04836): every
permutation is a free per-unit permutation (no head blocks) and each visit rebuilds its full cost from
freshly permuted copies. Prints one JSON object; ``--out`` also writes it to a file.

    python bench/align.py [--small] [--out result.json]
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from emit import emit_json
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from strategies.permutation import (
    PermutationSpec,
    apply_permutation,
    match_weights,
    permutation_spec,
    random_permutation,
)

T = TypeVar("T")
NOISE = 1e-3  # absolute; BERT initialises weights with std 0.02
SIZES = {
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "small": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100,
                  max_position_embeddings=64),
}


def reference_weight_matching(
    spec: PermutationSpec, params_a: Mapping[str, Tensor], params_b: Mapping[str, Tensor], max_iter: int = 100, seed: int = 0
) -> tuple[dict[str, Tensor], int]:
    """Port of git-re-basin's ``weight_matching`` loop; returns the permutations and the sweeps run."""
    sizes = {p: params_a[axes[0][0]].shape[axes[0][1]] for p, axes in spec.perm_to_axes.items()}
    perm = {p: torch.arange(n) for p, n in sizes.items()}
    names = list(perm)
    rng = np.random.default_rng(seed)
    for iteration in range(max_iter):
        progress = False
        for p_ix in rng.permutation(len(names)):
            p = names[p_ix]
            n = sizes[p]
            cost = torch.zeros(n, n)
            for key, axis in spec.perm_to_axes[p]:
                w_a = params_a[key].float()
                w_b = params_b[key].float()
                for other_axis, other_p in spec.axes_to_perm[key].items():
                    if other_axis != axis:
                        w_b = torch.index_select(w_b, other_axis, perm[other_p])
                w_a = torch.movedim(w_a, axis, 0).reshape(n, -1)
                w_b = torch.movedim(w_b, axis, 0).reshape(n, -1)
                cost += w_a @ w_b.T
            _, ci = linear_sum_assignment(cost.double().numpy(), maximize=True)
            old = cost[torch.arange(n), perm[p]].double().sum()
            new = cost[torch.arange(n), torch.from_numpy(ci)].double().sum()
            progress = progress or bool(new > old + 1e-12)
            perm[p] = torch.from_numpy(ci).long()
        if not progress:
            return perm, iteration + 1
    return perm, max_iter


class _SweepCounter(logging.Handler):
    """Reads the sweep count that match_weights logs when it finishes."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.sweeps = -1

    def emit(self, record: logging.LogRecord) -> None:
        self.sweeps = int(record.args[0])


def _timed(function: Callable[..., T], *args: object, **kwargs: object) -> tuple[T, float, float]:
    """Result, wall-clock seconds and process CPU seconds (all threads) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def _recovered(planted: Mapping[str, Tensor], found: Mapping[str, Tensor]) -> bool:
    """Found undoes planted: permuting by planted then found gathers every unit back to its place."""
    return all(torch.equal(planted[p][found[p]], torch.arange(len(found[p]))) for p in planted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny model for smoke tests")
    parser.add_argument("--out", type=Path, help="also write the JSON result here")
    parser.add_argument("--seed", type=int, default=0, help="sweep order of both matchers")
    args = parser.parse_args()

    from transformers import AutoModel, BertConfig

    size = "small" if args.small else "bert-base"
    torch.manual_seed(0)
    config = BertConfig(**SIZES[size])
    state = {"encoder." + key: value for key, value in AutoModel.from_config(config).state_dict().items()}
    state["heads.demo.weight"] = 0.02 * torch.randn(3, config.hidden_size)
    state["heads.demo.bias"] = torch.zeros(3)
    spec = permutation_spec(state, config.num_attention_heads, residual=True)
    generator = torch.Generator().manual_seed(1)
    planted = random_permutation(spec, state, generator)
    other = {
        key: value + NOISE * torch.randn(value.shape, generator=generator) if value.is_floating_point() else value
        for key, value in apply_permutation(state, spec, planted).items()
    }

    counter = _SweepCounter()
    logging.getLogger("strategies.permutation").addHandler(counter)
    logging.getLogger("strategies.permutation").setLevel(logging.INFO)
    load_before = os.getloadavg()[0]
    (ours, ours_s, ours_cpu_s) = _timed(match_weights, state, other, spec, seed=args.seed)
    ((reference, reference_sweeps), reference_s, reference_cpu_s) = _timed(
        reference_weight_matching, spec, state, other, seed=args.seed
    )

    result = {
        "size": size,
        "hidden": config.hidden_size,
        "layers": config.num_hidden_layers,
        "heads": config.num_attention_heads,
        "ffn": config.intermediate_size,
        "vocab": config.vocab_size,
        "noise": NOISE,
        "permutations": len(spec.perm_to_axes),
        "torch_threads": torch.get_num_threads(),
        "seed": args.seed,
        "load_avg_1m_before": round(load_before, 2),
        "load_avg_1m_after": round(os.getloadavg()[0], 2),
        "ours_s": round(ours_s, 3),
        "reference_s": round(reference_s, 3),
        "speedup": round(reference_s / ours_s, 2),
        "ours_cpu_s": round(ours_cpu_s, 3),
        "reference_cpu_s": round(reference_cpu_s, 3),
        "cpu_speedup": round(reference_cpu_s / ours_cpu_s, 2),
        "ours_sweeps": counter.sweeps,
        "reference_sweeps": reference_sweeps,
        "ours_recovered": _recovered(planted, ours),
        "reference_recovered": _recovered(planted, reference),
    }
    emit_json(result, args.out, indent=None)


if __name__ == "__main__":
    main()
