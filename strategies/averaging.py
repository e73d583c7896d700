"""FedAvg as a merge rule (McMahan et al. 2017): the key-wise weighted mean of the clients' states.

Every key is averaged over the clients that sent it, weighted by their examples, so a domain head is averaged
only over its own domain's clients; the global state only decides which keys exist. FedProx (Li et al. 2020)
merges with this same rule: its proximal term is added by the clients during training.
"""

from __future__ import annotations

import torch

from strategies.aggregation import weighted_mean
from strategies.update import Clients, MergeContext, State


def average(global_state: State, clients: Clients, context: MergeContext) -> dict[str, torch.Tensor]:
    return weighted_mean((client.state, client.weight) for client in clients)
