"""Subspace merge rules: TSV-Merge, Iso-C and Iso-CTS, data-free merges built from the SVDs of task vectors.

A client's task vector (delta) is its state minus the current global state. For every 2-D floating weight
matrix (Linear weights; not embedding matrices, whose rows are tokens rather than a linear map) that two or more
clients sent, these rules merge the deltas through their singular vectors; every other key (biases, LayerNorms,
embeddings, and keys one client sent alone, such as its domain's head) falls back to the weighted mean delta
(task arithmetic, weights = examples). The result is global + lambda * merged delta, in the global dtype.

* TSV-Merge (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025):
  each delta keeps its top k = max(1, floor(share * r / T)) singular triplets (r = min(m, n), T clients), so the
  rank is split among the experts; the kept left and right singular vectors are concatenated and each set is
  replaced by its nearest orthonormal matrix (polar factor), which decorrelates the tasks' subspaces, and the
  delta is rebuilt with the kept singular values. The matrices' merged delta is a sum over tasks, as in the paper.
* Iso-C (Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces",
  ICML 2025): the sum of the deltas with its spectrum flattened, every singular value set to their mean, so no
  direction (and no task) dominates the merged update.
* Iso-CTS (same paper): the top ``common`` share of the summed delta's directions (the common subspace) plus, per
  client, the top directions of its delta outside the common left subspace (task-specific subspaces, splitting the
  remaining rank evenly); the union is orthonormalised by polar factors and given one isotropic singular value,
  the mean of the kept singular values (the authors' code, danielm1405/iso-merging, sizes and levels it so).

As in the papers, the matrix merges are unweighted (every client counts as one task); client weights only enter
the fallback mean. SVDs run in float32 on the CPU (torch.linalg.svd, thin), so a merge is deterministic. Integer
tensors must agree and pass through, as in FedAvg.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from strategies.task_vectors import integers, keys_of, scaled
from strategies.update import Clients, MergeContext, State

Method = Callable[[Sequence[torch.Tensor]], torch.Tensor]


def tsv(global_state: State, clients: Clients, context: MergeContext, *, share: float, lambda_: float) -> dict[str, torch.Tensor]:
    """TSV-Merge: each client's top singular triplets (a ``share`` of the rank split among the clients),
    decorrelated across clients by polar factors; the weighted mean delta for everything else."""
    return merged_by(global_state, clients, lambda deltas: singular_vector_sum(deltas, share), lambda_)


def iso_c(global_state: State, clients: Clients, context: MergeContext, *, lambda_: float) -> dict[str, torch.Tensor]:
    """Iso-C: the summed delta with all singular values replaced by their mean; the weighted mean delta for
    everything else."""
    return merged_by(global_state, clients, lambda deltas: flattened(summed(deltas)), lambda_)


def iso_cts(global_state: State, clients: Clients, context: MergeContext, *, common: float, lambda_: float) -> dict[str, torch.Tensor]:
    """Iso-CTS: the summed delta's top ``common`` share of directions plus each client's own directions outside
    them, with one isotropic singular value; the weighted mean delta for everything else."""
    return merged_by(global_state, clients, lambda deltas: common_and_specific(deltas, common), lambda_)


def merged_by(global_state: State, clients: Clients, method: Method, lambda_: float) -> dict[str, torch.Tensor]:
    """global + lambda * merged delta for every float key some client sent: ``method`` over the float32 deltas
    of a weight matrix two or more clients sent, the weighted mean delta otherwise. A key one client sent
    (its domain's head) is that client's own: there is nothing to decorrelate, and flattening or truncating
    a lone head's spectrum would only damage it."""
    merged: dict[str, torch.Tensor] = {}
    for key, members in keys_of(clients).items():
        base = global_state[key]
        deltas = [client.state[key].float() - base.float() for client in members]
        if len(members) > 1 and is_matrix(key, base):
            delta = method(deltas)
        else:
            delta = weighted_mean(deltas, [client.weight for client in members])
        merged[key] = scaled(base, delta, lambda_)
    merged.update(integers(clients))
    return merged


def is_matrix(key: str, value: torch.Tensor) -> bool:
    """Whether a key is a linear map the SVD rules apply to: 2-D and not an embedding table (as the papers'
    code, which skips embeddings)."""
    return value.ndim == 2 and "embeddings" not in key


def weighted_mean(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """The fallback, task arithmetic's delta: sum w_i delta_i / sum w_i."""
    total = torch.zeros_like(deltas[0])
    for delta, weight in zip(deltas, weights):
        total.add_(delta, alpha=weight)
    return total.div_(sum(weights))


def summed(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """The plain sum of the deltas (task arithmetic's sum, as the Iso papers merge)."""
    total = deltas[0].clone()
    for delta in deltas[1:]:
        total.add_(delta)
    return total


def svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD in float32: matrix = U diag(S) Vh."""
    return torch.linalg.svd(matrix.float(), full_matrices=False)


def polar(matrix: torch.Tensor) -> torch.Tensor:
    """The orthonormal matrix nearest ``matrix`` (its polar factor, P Q^T of matrix = P S Q^T): decorrelates the
    columns of a concatenation of several clients' singular vectors while moving them as little as possible.
    An orthonormal matrix is its own polar factor; one wider than tall gets orthonormal rows instead."""
    p, _, qh = svd(matrix)
    return p @ qh


def flattened(matrix: torch.Tensor) -> torch.Tensor:
    """``matrix`` with every singular value replaced by their mean (an isotropic spectrum, same subspaces)."""
    u, s, vh = svd(matrix)
    return (u * s.mean()) @ vh


def singular_vector_sum(deltas: Sequence[torch.Tensor], share: float) -> torch.Tensor:
    """TSV-Merge of one matrix: each delta's top k = max(1, floor(share * r / T)) triplets, the concatenated left
    and right singular vectors each replaced by their polar factor, rebuilt with the kept singular values. With
    one delta and share 1 this is that delta (its singular vectors are already orthonormal)."""
    rank = min(deltas[0].shape)
    keep = min(rank, max(1, math.floor(share * rank / len(deltas))))
    lefts, values, rights = [], [], []
    for delta in deltas:
        u, s, vh = svd(delta)
        lefts.append(u[:, :keep])
        values.append(s[:keep])
        rights.append(vh[:keep])
    return (polar(torch.cat(lefts, dim=1)) * torch.cat(values)) @ polar(torch.cat(rights, dim=0))


def common_and_specific(deltas: Sequence[torch.Tensor], common: float) -> torch.Tensor:
    """Iso-CTS of one matrix: the summed delta's top k_c directions, and each delta's top (r - k_c) / T directions
    once the common left subspace is projected out; the union, orthonormalised by polar factors, rebuilt with every
    singular value the mean of the kept ones. As the authors' code: k_c = r - round((r - floor(common r)) / T) T,
    so that the task-specific part divides evenly among the T deltas. With common = 1 this is Iso-C."""
    u, s, vh = svd(summed(deltas))
    rank, count = s.numel(), len(deltas)
    shared = max(1, rank - round((rank - int(common * rank)) / count) * count)
    each = (rank - shared) // count
    basis = u[:, :shared]
    lefts, rights, values = [basis], [vh[:shared]], [s[:shared]]
    if each > 0:
        for delta in deltas:
            task_u, task_s, task_vh = svd(delta - basis @ (basis.T @ delta))
            lefts.append(task_u[:, :each])
            rights.append(task_vh[:each])
            values.append(task_s[:each])
    level = torch.cat(values).mean()
    return (polar(torch.cat(lefts, dim=1)) * level) @ polar(torch.cat(rights, dim=0))
