"""Fisher-weighted averaging (Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022).

Each client also sends the diagonal of its empirical Fisher information at its trained weights (the mean over
examples of the squared gradient of log p(label | text), computed on its own data, ``fl.modeling.client_statistics``). The
server merges every coordinate as sum_i w_i F_i theta_i / sum_i w_i F_i, with w_i the client's examples and
F_i floored at ``floor`` so that coordinates no client has information about fall back to the weighted mean.
Keys no client sent a Fisher for (frozen word embeddings have no gradient) are merged by FedAvg; a key that
some of its clients sent a Fisher for and others did not is refused. One pass over the clients, two float32
buffers per key.
"""

from __future__ import annotations

import torch

from strategies.aggregation import StreamingMean, UpdateError, all_finite
from strategies.update import Clients, MergeContext, State


def fisher_average(global_state: State, clients: Clients, context: MergeContext, *, floor: float) -> dict[str, torch.Tensor]:
    """sum w F theta / sum w F per coordinate (F floored), FedAvg for keys without a Fisher."""
    require_all_or_none(clients)
    numerators: dict[str, torch.Tensor] = {}
    denominators: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    plain = StreamingMean()
    for client in clients:
        rest = {}
        for key, value in client.state.items():
            information = client.statistics.get(key)
            if information is None:
                rest[key] = value
                continue
            weight = information.float().clamp(min=floor).mul_(client.weight)
            if key in numerators:
                numerators[key].addcmul_(weight, value)
                denominators[key].add_(weight)
            else:
                numerators[key] = weight * value
                denominators[key] = weight
                dtypes[key] = value.dtype
        if rest:
            plain.add(rest, client.weight)
    merged = plain.result() if plain.num_states else {}
    merged.update({k: n.div_(denominators[k]).to(dtypes[k]) for k, n in numerators.items()})
    return merged


def require_all_or_none(clients: Clients) -> None:
    """Every client that sent a key sent its Fisher too, or none did."""
    with_fisher: dict[str, bool] = {}
    for client in clients:
        for key in client.state:
            has = key in client.statistics
            if with_fisher.setdefault(key, has) != has:
                missing = "has no" if not has else "has a"
                raise UpdateError(f"{client.name}: {missing} Fisher for '{key}', unlike an earlier client")


def check_fisher(state: State, fisher: State, client: str) -> None:
    """A diagonal Fisher: one finite, non-negative tensor per float weight the client sent, of its shape."""
    for key, information in fisher.items():
        weight = state.get(key)
        if weight is None or not weight.is_floating_point():
            raise UpdateError(f"{client}: Fisher for '{key}', which is not a float weight it sent")
        if information.shape != weight.shape:
            raise UpdateError(f"{client}: Fisher for '{key}' has shape {tuple(information.shape)}, expected {tuple(weight.shape)}")
        if not information.is_floating_point() or not all_finite(information):
            raise UpdateError(f"{client}: Fisher for '{key}' has non-finite values (NaN or Inf)")
        if bool((information < 0).any()):
            raise UpdateError(f"{client}: Fisher for '{key}' has negative values (a squared gradient is >= 0)")
