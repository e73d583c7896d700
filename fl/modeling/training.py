"""Local fine-tuning of the multi-head encoder: what a client does in one round.

The encoder and the heads of the domains being trained get AdamW (heads at their own, larger rate,
since they start from linear probes that only need to follow the drifting features). With
``proximal_mu > 0`` the FedProx term mu/2 * ||w - w_global||^2 (Li et al. 2020, arXiv 1812.06127)
is added, with the global weights cloned once at the start of the round.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from fl.data.batches import Encoded, collate, training_batches
from fl.modeling.model import MultiHeadEncoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    steps: int  # optimizer steps per domain
    batch_size: int = 16
    lr: float = 1e-4  # encoder learning rate
    head_lr: float = 1e-3  # heads start from probes; they need to move faster than the encoder
    weight_decay: float = 0.01
    proximal_mu: float = 0.0  # FedProx; 0 = plain local SGD
    freeze_word_embeddings: bool = True  # 11.7M of 22.7M MiniLM weights; frozen is faster and merges cleanly
    schedule: str = "linear"  # 'linear': 10% warm-up then linear decay to 0 within each call; 'constant'


@dataclass
class TrainReport:
    losses: list[float] = field(default_factory=list)
    proximal: list[float] = field(default_factory=list)  # the FedProx term at each step (all 0 without it)
    num_examples: int = 0

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else float("nan")


def trainable_parameters(model: MultiHeadEncoder, domains: Sequence[str], settings: TrainSettings) -> dict[str, nn.Parameter]:
    """The named parameters this training touches: the encoder (minus frozen parts) and the given heads."""
    chosen: dict[str, nn.Parameter] = {}
    for name, param in model.named_parameters():
        if name.startswith("heads."):
            if name.split(".")[1] in domains:
                chosen[name] = param
        elif not (settings.freeze_word_embeddings and "word_embeddings" in name):
            chosen[name] = param
    return chosen


def proximal_term(params: Mapping[str, torch.Tensor], anchor: Mapping[str, torch.Tensor], mu: float) -> torch.Tensor:
    """mu/2 * sum ||w - w_anchor||^2 over the trained parameters."""
    total = sum(((params[k] - anchor[k]) ** 2).sum() for k in params)
    return 0.5 * mu * total


SCHEDULES = ("linear", "constant")


def lr_factor(schedule: str, steps: int) -> Callable[[int], float]:
    """Learning-rate multiplier per step: warm-up keeps the first steps from knocking the probe heads off."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule '{schedule}': expected one of {', '.join(SCHEDULES)}")
    if schedule == "constant":
        return lambda step: 1.0
    warmup = max(1, steps // 10)
    return lambda step: (step + 1) / warmup if step < warmup else max(0.0, (steps - step) / max(1, steps - warmup))


def optimizer_for(
    model: MultiHeadEncoder, domains: Sequence[str], settings: TrainSettings
) -> tuple[dict[str, nn.Parameter], torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the parameters this training touches (only those require grad), the heads at their own rate,
    with the schedule over settings.steps."""
    params = trainable_parameters(model, domains, settings)
    for name, param in model.named_parameters():
        param.requires_grad_(name in params)
    heads = [p for n, p in params.items() if n.startswith("heads.")]
    body = [p for n, p in params.items() if not n.startswith("heads.")]
    optimizer = torch.optim.AdamW(
        [{"params": body, "lr": settings.lr}, {"params": heads, "lr": settings.head_lr}],
        weight_decay=settings.weight_decay,
    )
    return params, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(settings.schedule, settings.steps))


def release(model: MultiHeadEncoder) -> None:
    """After training: eval mode, gradients dropped (a model kept between calls, a client actor's, must not keep a
    copy of them) and every parameter trainable again."""
    model.eval()
    model.zero_grad(set_to_none=True)
    for param in model.parameters():
        param.requires_grad_(True)


def train(
    model: MultiHeadEncoder,
    tasks: Sequence[tuple[str, Encoded]],
    settings: TrainSettings,
    seed: int,
    on_step: Callable[[int, str, float], None] | None = None,
) -> TrainReport:
    """Fine-tune on one or more domains for settings.steps optimizer steps; with several domains each step takes
    one batch of every domain and follows the sum of their losses (mixed batches). Alternating one optimizer step
    per domain instead doubled the encoder's steps and cost the multi-task baseline 4.8 [3.0, 6.5] points of legal
    accuracy on the default (measured), a weaker baseline than the standard one."""
    if settings.steps < 1:
        raise ValueError(f"steps must be >= 1, got {settings.steps}")
    torch.manual_seed(seed)
    domains = [d for d, _ in tasks]
    params, optimizer, scheduler = optimizer_for(model, domains, settings)
    anchor = {k: p.detach().clone() for k, p in params.items()} if settings.proximal_mu > 0 else None
    streams = [training_batches(len(data), settings.batch_size, seed + i) for i, (_, data) in enumerate(tasks)]
    loss_fn = nn.CrossEntropyLoss()
    report = TrainReport()
    model.train()
    for step in range(settings.steps):
        losses = []
        for (domain, data), stream in zip(tasks, streams):
            batch = collate(data, next(stream))
            logits = model(domain, batch.input_ids, batch.attention_mask)
            losses.append((domain, loss_fn(logits, batch.labels.to(logits.device)), len(batch.labels)))
        prox = proximal_term(params, anchor, settings.proximal_mu) if anchor is not None else torch.zeros(())
        objective = sum(loss for _, loss, _ in losses) + prox
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        optimizer.step()
        scheduler.step()
        report.proximal.append(prox.item())
        for domain, loss, examples in losses:
            report.losses.append(loss.item())
            report.num_examples += examples
            if on_step is not None:
                on_step(step, domain, loss.item())
    release(model)
    return report
