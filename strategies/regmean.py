"""RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023).

For a linear layer y = x W^T, the weights whose outputs best match every client's on its own inputs solve
min_W sum_i w_i ||X_i W^T - X_i W_i^T||^2, i.e. W^T = (sum_i w_i G_i)^-1 sum_i w_i G_i W_i^T with G_i the
Gram matrix of the layer's inputs on client i's data (``fl.modeling.client_statistics`` sends the mean of x x^T over
non-padding tokens, keyed by the layer's weight). As in the paper, the off-diagonal entries of each G_i are
scaled by ``alpha`` (1: the exact least-squares merge; 0: a per-input-feature weighted mean), which guards
against inputs that are nearly collinear on one client. With every G_i the identity this is FedAvg.
Biases, LayerNorms, embeddings and heads are averaged with the clients' example weights.

One pass over the clients: per layer the server keeps sum w G (in x in) and sum w G W^T (in x out), then
solves once per layer in float64 (Cholesky); a singular system (an input feature that is zero on every client)
gets a ridge of 1e-9 of its mean diagonal towards the clients' mean weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from strategies.aggregation import StreamingMean, UpdateError, all_finite
from strategies.update import Clients, MergeContext, State

RIDGE = 1e-9
SYMMETRY_RTOL = 1e-4


def regmean(global_state: State, clients: Clients, context: MergeContext, *, alpha: float) -> dict[str, torch.Tensor]:
    """Least-squares merge of every layer with Grams; weighted mean of everything else."""
    grams: dict[str, torch.Tensor] = {}
    products: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    plain = StreamingMean()
    layers = {key for client in clients for key in client.statistics}
    for client in clients:
        rest = {}
        for key, value in client.state.items():
            if key not in layers:
                rest[key] = value
                continue
            if key not in client.statistics:
                raise UpdateError(f"{client.name}: no Gram for '{key}', unlike another client")
            gram = shrunk(client.statistics[key], alpha).mul_(client.weight)
            product = gram @ value.float().T
            if key in grams:
                grams[key].add_(gram)
                products[key].add_(product)
            else:
                grams[key], products[key], dtypes[key] = gram, product, value.dtype
        if rest:
            plain.add(rest, client.weight)
    merged = plain.result() if plain.num_states else {}
    for key in grams:
        solution = solve(grams[key], products[key], lambda key=key: mean_of(clients, key))
        merged[key] = solution.T.to(dtypes[key]).contiguous()
    return merged


def mean_of(clients: Clients, key: str) -> torch.Tensor:
    """The clients' weighted mean of one weight, in float64."""
    total = sum(c.weight for c in clients if key in c.state)
    return sum(c.weight * c.state[key].double() for c in clients if key in c.state) / total


def shrunk(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * G off the diagonal, G's own diagonal on it (a new float32 tensor)."""
    out = gram.float() * alpha
    out.diagonal().copy_(gram.diagonal())
    return out


def solve(gram: torch.Tensor, product: torch.Tensor, mean: Callable[[], torch.Tensor]) -> torch.Tensor:
    """gram^-1 @ product in float64 by Cholesky (a sum of shrunk Grams is symmetric positive semi-definite; 25-30%
    faster than LU here). When gram is singular (an input feature no client's data ever sets), a tiny ridge pulls
    the solution towards the clients' weighted mean (out x in, computed only then): the unseen feature's weights
    become their mean, every other feature's move by about the ridge."""
    a, b = gram.double(), product.double()
    factor, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0:
        ridge = RIDGE * float(a.diagonal().mean().clamp(min=torch.finfo(torch.float64).tiny))
        factor = torch.linalg.cholesky(a + ridge * torch.eye(len(a), dtype=a.dtype))
        b = b + ridge * mean().T
    return torch.cholesky_solve(b, factor).float()


def check_grams(state: State, grams: State, client: str) -> None:
    """One finite, symmetric in x in matrix with a non-negative diagonal per 2-D weight (out x in) it names."""
    for key, gram in grams.items():
        weight = state.get(key)
        if weight is None or weight.ndim != 2 or not weight.is_floating_point():
            raise UpdateError(f"{client}: Gram for '{key}', which is not a 2-D float weight it sent")
        width = weight.shape[1]
        if tuple(gram.shape) != (width, width):
            raise UpdateError(f"{client}: Gram for '{key}' has shape {tuple(gram.shape)}, expected {(width, width)}")
        if not gram.is_floating_point() or not all_finite(gram):
            raise UpdateError(f"{client}: Gram for '{key}' has non-finite values (NaN or Inf)")
        scale = float(gram.abs().max())
        if float((gram - gram.T).abs().max()) > SYMMETRY_RTOL * scale:
            raise UpdateError(f"{client}: Gram for '{key}' is not symmetric")
        if bool((gram.diagonal() < 0).any()):
            raise UpdateError(f"{client}: Gram for '{key}' has a negative diagonal entry (x x^T has none)")
