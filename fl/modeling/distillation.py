"""Ensemble distillation into one student: model fusion as in FedDF (Lin et al. 2020, arXiv 2006.07242).

The student (a MultiHeadEncoder) reads unlabelled text of every domain and learns to match the teachers'
logits for that domain with the temperature-scaled KL divergence of Hinton et al. 2015 (arXiv 1503.02531).
Only text and logits pass between teacher and student, so the student may differ from the teachers in
architecture, width or vocabulary: the caller computes each teacher's logits with that teacher's own
tokenizer and passes them with the student's encoding of the same texts, row i of ``teacher_logits[d]``
belonging to example i of ``inputs[d]``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from fl.data.batches import Batch, Encoded
from fl.modeling.evaluation import per_example, pooled_features
from fl.modeling.model import MultiHeadEncoder
from fl.modeling.probe import fit_probe
from fl.modeling.train_settings import TrainSettings
from fl.modeling.training import lr_factor, run_steps

log = logging.getLogger(__name__)


def check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature {temperature}: expected a number > 0")


@dataclass(frozen=True)
class DistillSettings:
    steps: int  # optimizer steps; each takes one batch of every domain
    batch_size: int = 16
    lr: float = 5e-5  # encoder learning rate: the student starts from trained weights, distillation only refines them
    head_lr: float = 1e-3  # heads start from probes or other tasks' heads; they need to move faster
    temperature: float = 2.0  # softens the teachers' distributions so non-argmax classes carry signal (Hinton et al.)
    weight_decay: float = 0.01
    schedule: str = "linear"  # as fl.modeling.training.lr_factor: 10% warm-up then linear decay; or 'constant'
    freeze_word_embeddings: bool = True  # as in fine-tuning: the student's vocabulary keeps its own embeddings

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps {self.steps}: expected an integer >= 1")
        check_temperature(self.temperature)
        lr_factor(self.schedule, self.steps)  # refuses an unknown schedule now, not at the first step


@dataclass
class DistillReport:
    losses: list[float] = field(default_factory=list)  # per step: the sum of the domains' distillation losses

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else float("nan")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), averaged over the batch; T^2 keeps gradients comparable
    across temperatures."""
    check_temperature(temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)}: expected equal shapes")
    student = nn.functional.log_softmax(student_logits / temperature, dim=-1)
    teacher = nn.functional.log_softmax(teacher_logits.to(student_logits.dtype) / temperature, dim=-1)
    return temperature**2 * nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean")


def check_alignment(student: MultiHeadEncoder, inputs: Mapping[str, Encoded], teacher_logits: Mapping[str, torch.Tensor], domains: Sequence[str]) -> None:
    """Every domain has a student head, inputs, and teacher logits of shape (examples, head outputs)."""
    for domain in domains:
        if domain not in student.heads:
            raise ValueError(f"domain '{domain}': the student has no head for it; expected one of {', '.join(student.domains)}")
        if domain not in inputs or domain not in teacher_logits:
            raise ValueError(f"domain '{domain}': expected both inputs and teacher logits for it")
        logits, rows, classes = teacher_logits[domain], len(inputs[domain]), student.heads[domain].out_features
        if logits.dim() != 2 or logits.shape[0] != rows:
            raise ValueError(f"domain '{domain}': teacher logits {tuple(logits.shape)} for {rows} inputs; expected {rows} rows")
        if logits.shape[1] != classes:
            raise ValueError(f"domain '{domain}': teacher logits have {logits.shape[1]} columns, the student's head {classes} outputs; expected equal")


@torch.no_grad()
def student_logits(student: MultiHeadEncoder, domain: str, data: Encoded) -> torch.Tensor:
    """The student's logits for every example of `data`, in data order, on the CPU (eval mode)."""
    student.eval()
    return per_example(data, student.heads[domain].out_features, lambda ids, mask: student(domain, ids, mask).float())


def kl_to_teacher(
    student: MultiHeadEncoder, inputs: Mapping[str, Encoded], teacher_logits: Mapping[str, torch.Tensor], temperature: float
) -> dict[str, float]:
    """Mean KL(teacher || student) at `temperature` per domain over all its examples (without the loss's T^2)."""
    check_temperature(temperature)
    check_alignment(student, inputs, teacher_logits, list(inputs))
    return {
        domain: distillation_loss(student_logits(student, domain, data), teacher_logits[domain].float().cpu(), temperature).item()
        / temperature**2
        for domain, data in inputs.items()
    }


def fit_heads_to_teacher(
    student: MultiHeadEncoder, inputs: Mapping[str, Encoded], teacher_logits: Mapping[str, torch.Tensor], domains: Sequence[str]
) -> None:
    """Replace the heads of `domains` by linear probes on the student's pooled features against the teacher's argmax,
    for a student without a fitting head there (another source model's head), so distillation starts from a sensible
    head rather than a random one."""
    check_alignment(student, inputs, teacher_logits, domains)
    for domain in domains:
        labels = teacher_logits[domain].argmax(dim=1).cpu()
        probe = fit_probe(pooled_features(student, inputs[domain]), labels, student.heads[domain].out_features)
        with torch.no_grad():
            student.heads[domain].weight.copy_(probe.weight)
            student.heads[domain].bias.copy_(probe.bias)


def distill(
    student: MultiHeadEncoder,
    inputs: Mapping[str, Encoded],
    teacher_logits: Mapping[str, torch.Tensor],
    settings: DistillSettings,
    seed: int,
    on_step: Callable[[int, str, float], None] | None = None,
) -> DistillReport:
    """Train the student for settings.steps steps; each step takes one batch of every domain in `inputs` and follows
    the sum of their distillation losses, in fine-tuning's step loop (fl.modeling.training.run_steps). The student ends
    in eval mode."""
    domains = list(inputs)
    check_alignment(student, inputs, teacher_logits, domains)
    training = TrainSettings(settings.steps, settings.batch_size, settings.lr, settings.head_lr, settings.weight_decay,
                             freeze_word_embeddings=settings.freeze_word_embeddings, schedule=settings.schedule)

    def to_teacher(domain: str, logits: torch.Tensor, batch: Batch, indices: np.ndarray) -> torch.Tensor:
        target = teacher_logits[domain][torch.as_tensor(indices)].to(logits.device)
        return distillation_loss(logits, target, settings.temperature)

    report = DistillReport(run_steps(student, [(d, inputs[d]) for d in domains], training, seed, to_teacher, on_step).objectives)
    log.debug("distilled %d steps over %s: mean loss %.4f", settings.steps, ", ".join(domains), report.mean_loss)
    return report
