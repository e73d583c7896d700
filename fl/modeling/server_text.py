"""The unlabelled text a server holds, as merge rules that learn from it read it (``strategies.update.ServerText``).

The server's texts are the first examples of each domain's training split with their labels dropped: the
domains' own text (not their test sets, which score the merge), as a server that collected unlabelled samples
would hold. The model runs the candidate state through ``torch.func.functional_call``, so the rule's coefficients
get gradients without the model's own weights being touched.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fl.data.batches import Batch, Encoded, collate
from fl.modeling.model import MultiHeadEncoder
from strategies.update import ServerText

SERVER_BATCHES = 2  # batches of text per domain the server holds for such rules
SERVER_BATCH_SIZE = 16


def server_text(model: MultiHeadEncoder, train_sets: Mapping[str, Encoded], batches: int = SERVER_BATCHES, batch_size: int = SERVER_BATCH_SIZE) -> ServerText:
    """The first ``batches x batch_size`` training texts of each domain (fewer when the split is smaller), unlabelled."""
    held: dict[str, list[Batch]] = {}
    for domain, data in train_sets.items():
        count = min(len(data), batches * batch_size)
        held[domain] = [collate(data, range(start, min(start + batch_size, count))) for start in range(0, count, batch_size)]

    def logits(state: Mapping[str, torch.Tensor], domain: str, index: int) -> torch.Tensor:
        model.eval()  # no dropout: a step of the rule is deterministic
        batch = held[domain][index]
        device = model.device
        weights = {key: value.to(device) for key, value in state.items()}
        return torch.func.functional_call(model, weights, (domain, batch.input_ids, batch.attention_mask))

    return ServerText(logits, {domain: len(found) for domain, found in held.items() if found})
