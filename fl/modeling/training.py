"""Local fine-tuning of the multi-head encoder: what a client does in one round.

The encoder and the heads of the domains being trained get AdamW (heads at their own, larger rate,
since they start from linear probes that only need to follow the drifting features). With
``proximal_mu > 0`` the FedProx term mu/2 * ||w - w_global||^2 (Li et al. 2020, arXiv 1812.06127)
is added, with the global weights cloned once at the start of the round. The step loop (``run_steps``) is
shared with ensemble distillation (fl.modeling.distillation), which passes its own loss per batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from fl.data.batches import Batch, Encoded, collate, training_batches
from fl.modeling.model import MultiHeadEncoder
from fl.modeling.train_settings import SCHEDULES, TrainSettings
from strategies.lora import has_adapters, trained_by_lora

log = logging.getLogger(__name__)


@dataclass
class TrainReport:
    losses: list[float] = field(default_factory=list)
    proximal: list[float] = field(default_factory=list)  # the FedProx term at each step (all 0 without it)
    objectives: list[float] = field(default_factory=list)  # per step: what it followed, the losses' sum plus the FedProx term
    num_examples: int = 0

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else float("nan")


def trainable_parameters(model: MultiHeadEncoder, domains: Sequence[str], settings: TrainSettings) -> dict[str, nn.Parameter]:
    """The named parameters this training touches: the encoder (minus frozen parts; only the adapters of a model
    with LoRA adapters) and the given heads."""
    named = dict(model.named_parameters())
    adapters = has_adapters(named)
    chosen: dict[str, nn.Parameter] = {}
    for name, param in named.items():
        if name.startswith("heads."):
            if name.split(".")[1] in domains:
                chosen[name] = param
        elif adapters:
            if trained_by_lora(name, settings.freeze_lora_a):
                chosen[name] = param
        elif not (settings.freeze_word_embeddings and "word_embeddings" in name):
            chosen[name] = param
    return chosen


def proximal_term(params: Mapping[str, torch.Tensor], anchor: Mapping[str, torch.Tensor], mu: float) -> torch.Tensor:
    """mu/2 * sum ||w - w_anchor||^2 over the trained parameters."""
    total = sum(((params[k] - anchor[k]) ** 2).sum() for k in params)
    return 0.5 * mu * total


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


BatchLoss = Callable[[str, torch.Tensor, Batch, np.ndarray], torch.Tensor]
"""(domain, the model's logits on a batch, the batch, its example indices) -> that batch's loss."""


def run_steps(
    model: MultiHeadEncoder,
    tasks: Sequence[tuple[str, Encoded]],
    settings: TrainSettings,
    seed: int,
    batch_loss: BatchLoss,
    on_step: Callable[[int, str, float], None] | None = None,
) -> TrainReport:
    """The step loop of fine-tuning and distillation: settings.steps optimizer steps, each on one batch of every task
    (the i-th task's batches shuffled with seed + i) following the sum of their `batch_loss` plus the FedProx term
    when settings.proximal_mu > 0 (global weights cloned before the first step); the model ends released."""
    if settings.steps < 1:
        raise ValueError(f"steps must be >= 1, got {settings.steps}")
    torch.manual_seed(seed)
    params, optimizer, scheduler = optimizer_for(model, [d for d, _ in tasks], settings)
    anchor = {k: p.detach().clone() for k, p in params.items()} if settings.proximal_mu > 0 else None
    streams = [training_batches(len(data), settings.batch_size, seed + i) for i, (_, data) in enumerate(tasks)]
    report = TrainReport()
    model.train()
    for step in range(settings.steps):
        losses = []
        for (domain, data), stream in zip(tasks, streams):
            indices = next(stream)
            batch = collate(data, indices)
            logits = model(domain, batch.input_ids, batch.attention_mask)
            losses.append((domain, batch_loss(domain, logits, batch, indices), len(batch.labels)))
        prox = proximal_term(params, anchor, settings.proximal_mu) if anchor is not None else None
        objective = sum(loss for _, loss, _ in losses)
        if prox is not None:
            objective = objective + prox
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        optimizer.step()
        scheduler.step()
        report.objectives.append(objective.item())
        report.proximal.append(prox.item() if prox is not None else 0.0)
        for domain, loss, examples in losses:
            report.losses.append(loss.item())
            report.num_examples += examples
            if on_step is not None:
                on_step(step, domain, report.losses[-1])
    release(model)
    return report


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
    loss_fn = nn.CrossEntropyLoss()

    def cross_entropy(domain: str, logits: torch.Tensor, batch: Batch, indices: np.ndarray) -> torch.Tensor:
        return loss_fn(logits, batch.labels.to(logits.device))

    return run_steps(model, tasks, settings, seed, cross_entropy, on_step)
