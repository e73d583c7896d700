"""Linear probes on the frozen base encoder's features.

They are the 'base' baseline, and every head (experts, multi-task, federated) starts from them,
as in LP-FT (Kumar et al. 2022, arXiv 2202.10054): fine-tuning from a fitted head distorts the
pretrained features less than fine-tuning from a random one.
"""

from __future__ import annotations

import torch
from torch import nn


def fit_probe(features: torch.Tensor, labels: torch.Tensor, num_labels: int, l2: float = 1e-3, max_iter: int = 200) -> nn.Linear:
    """Multinomial logistic regression by full-batch L-BFGS on standardised-free features (deterministic)."""
    head = nn.Linear(features.shape[1], num_labels)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")
    loss_fn = nn.CrossEntropyLoss()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = loss_fn(head(features), labels) + 0.5 * l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return head
