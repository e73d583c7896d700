"""The 'permuted' start: each client gets its own random, functionally identical permutation of the base.

It stands in for domain models that came from separate training runs: their hidden units are in
unrelated orders, so position-by-position averaging mixes unrelated units (Ainsworth et al. 2022,
arXiv 2209.04836), while weight matching can undo the permutation. Every symmetry is used, the
residual stream included, so the permuted model's logits equal the base's.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fl.modeling.model import num_attention_heads
from fl.run import seeds
from fl.run.config import RunConfig
from strategies.permutation import apply_permutation, permutation_spec, random_permutation


def permuted_copy(state: Mapping[str, torch.Tensor], num_heads: int, seed: int) -> dict[str, torch.Tensor]:
    """`state` with a random permutation of heads, within-head dims, FFN units and the residual stream."""
    spec = permutation_spec(state, num_heads, residual=True)
    generator = torch.Generator().manual_seed(seed)
    return apply_permutation(state, spec, random_permutation(spec, state, generator))


def client_start(config: RunConfig, start: Mapping[str, torch.Tensor], client_index: int) -> dict[str, torch.Tensor]:
    """Where client `client_index` (and the expert trained like it) starts: the shared start or, with
    ``--init permuted``, its own permutation of it, the same for the same run seed."""
    if config.init != "permuted":
        return dict(start)
    return permuted_copy(start, num_attention_heads(config.model), seeds.client_permutation(config.seed, client_index))
