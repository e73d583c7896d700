"""Statistics a client computes on its own data after training, for the rules that weigh clients by them.

* ``fisher``: the diagonal of the empirical Fisher information at the trained weights (Matena & Raffel 2022):
  the mean over examples of the squared gradient of log p(label | text), one example at a time, since the
  square of a batch's gradient is not the mean of the examples' squared gradients. Only the weights this
  client trains get one (the encoder without frozen parts, and its own head).
* ``gram``: for every linear layer of the encoder, the mean of x x^T over the layer's inputs (RegMean, Jin et
  al. 2023): every non-padding token for token-wise layers, one row per example for the pooler.

Both use ``batches`` training batches drawn with the client's seed, with the model in evaluation mode (no
dropout), and are keyed like the weights the client sends.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from fl.data.batches import Batch, Encoded, collate, training_batches
from fl.modeling.model import MultiHeadEncoder
from fl.modeling.train_settings import TrainSettings
from fl.modeling.training import trainable_parameters

STATISTICS = ("fisher", "gram")


def sampled_batches(data: Encoded, batches: int, batch_size: int, seed: int) -> Iterator[Batch]:
    stream = training_batches(len(data), batch_size, seed)
    for _ in range(batches):
        yield collate(data, next(stream))


def fisher_diagonal(
    model: MultiHeadEncoder, domain: str, data: Encoded, batches: int, settings: TrainSettings, seed: int
) -> dict[str, torch.Tensor]:
    """Mean squared per-example gradient of the log-likelihood of every weight the client trains."""
    params = trainable_parameters(model, [domain], settings)
    sums = {name: torch.zeros_like(p) for name, p in params.items()}
    examples = 0
    model.eval()
    for name, param in model.named_parameters():
        param.requires_grad_(name in params)  # no graph for the frozen word embeddings and other heads
    try:
        for batch in sampled_batches(data, batches, settings.batch_size, seed):
            for i in range(len(batch.labels)):
                logits = model(domain, batch.input_ids[i : i + 1], batch.attention_mask[i : i + 1])
                loss = nn.functional.cross_entropy(logits, batch.labels[i : i + 1].to(logits.device))
                grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
                for total, grad in zip(sums.values(), grads):
                    if grad is not None:
                        total.addcmul_(grad, grad)
                examples += 1
    finally:
        for param in model.parameters():
            param.requires_grad_(True)
    return {name: (total / examples).cpu() for name, total in sums.items()}


@contextmanager
def recording_inputs(model: MultiHeadEncoder) -> Iterator[tuple[dict[str, torch.Tensor], list[torch.Tensor]]]:
    """Adds x^T x of each linear layer's inputs into the first dict (by weight key) while active; the caller
    puts the batch's attention mask into the list so that padding tokens are left out."""
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    mask: list[torch.Tensor] = []

    def hook(key: str):
        def record(_module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
            x = inputs[0].detach()
            x = x[mask[0].bool()] if x.ndim == 3 else x.reshape(-1, x.shape[-1])
            x = x.float()
            sums[key] = sums[key].addmm_(x.T, x) if key in sums else x.T @ x
            rows[key] = rows.get(key, 0) + x.shape[0]

        return record

    handles = [
        module.register_forward_hook(hook(f"encoder.{name}.weight"))
        for name, module in model.encoder.named_modules()
        if isinstance(module, nn.Linear)
    ]
    try:
        yield sums, mask
    finally:
        for handle in handles:
            handle.remove()
    for key in sums:
        sums[key].div_(rows[key])


@torch.no_grad()
def input_grams(model: MultiHeadEncoder, data: Encoded, batches: int, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
    """Mean x x^T of the inputs of every linear layer of the encoder, keyed by the layer's weight."""
    model.eval()
    with recording_inputs(model) as (grams, mask):
        for batch in sampled_batches(data, batches, batch_size, seed):
            mask[:] = [batch.attention_mask.to(model.device)]
            model.embed(batch.input_ids, batch.attention_mask)
    return {key: gram.cpu() for key, gram in grams.items()}


def client_statistic(
    name: str, model: MultiHeadEncoder, domain: str, data: Encoded, batches: int, settings: TrainSettings, seed: int
) -> dict[str, torch.Tensor]:
    """The statistic a rule asked for (its name in the train config)."""
    if name == "fisher":
        return fisher_diagonal(model, domain, data, batches, settings, seed)
    if name == "gram":
        return input_grams(model, data, batches, settings.batch_size, seed)
    raise ValueError(f"statistic '{name}': expected one of {', '.join(STATISTICS)}")

