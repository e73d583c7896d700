"""Ensemble distillation: the student moves towards the teachers, deterministically, and bad inputs are refused."""

import pytest
import torch
from transformers import BertConfig, BertModel

from fl.data.batches import Encoded
from fl.modeling.distillation import (
    DistillSettings,
    distill,
    distillation_loss,
    fit_heads_to_teacher,
    kl_to_teacher,
    student_logits,
)
from fl.modeling.model import MultiHeadEncoder

LABELS = {"bio": 3, "legal": 4}


def tiny_model(seed: int, hidden: int = 32) -> MultiHeadEncoder:
    torch.manual_seed(seed)
    config = BertConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100)
    return MultiHeadEncoder(BertModel(config), LABELS).eval()


def random_inputs(n: int, seed: int) -> Encoded:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 12, (n,), generator=generator).tolist()
    ids = tuple(tuple(torch.randint(1, 100, (k,), generator=generator).tolist()) for k in lengths)
    return Encoded(ids, torch.zeros(n, dtype=torch.long), pad_id=0)


def setup() -> tuple[MultiHeadEncoder, dict[str, Encoded], dict[str, torch.Tensor]]:
    """A student and, as teacher, a wider random model whose heads are scaled up so its predictions are confident."""
    inputs = {"bio": random_inputs(40, 1), "legal": random_inputs(40, 2)}
    teacher = tiny_model(seed=7, hidden=48)
    with torch.no_grad():
        for head in teacher.heads.values():
            head.weight.mul_(20.0)
    logits = {d: student_logits(teacher, d, data) for d, data in inputs.items()}
    return tiny_model(seed=0), inputs, logits


def test_distillation_lowers_the_kl_to_the_teacher_in_every_domain_example_by_example() -> None:
    student, inputs, teacher = setup()
    order = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    shuffled = {d: logits[order] for d, logits in teacher.items()}  # the same marginal, other examples' targets
    before = kl_to_teacher(student, inputs, teacher, temperature=2.0)

    report = distill(student, inputs, teacher, DistillSettings(steps=60, lr=1e-3, head_lr=1e-2), seed=0)

    after = kl_to_teacher(student, inputs, teacher, temperature=2.0)
    after_shuffled = kl_to_teacher(student, inputs, shuffled, temperature=2.0)
    assert len(report.losses) == 60
    for domain in LABELS:
        assert after[domain] < 0.85 * before[domain], (domain, before, after)
        assert after[domain] < 0.85 * after_shuffled[domain], (domain, after, after_shuffled)


def test_distillation_is_deterministic_by_seed_and_restores_the_model() -> None:
    student, inputs, teacher = setup()
    start = {k: v.clone() for k, v in student.state_dict().items()}
    settings = DistillSettings(steps=3, batch_size=8, lr=1e-3)

    def run(seed: int) -> dict[str, torch.Tensor]:
        student.load_state_dict(start)
        distill(student, inputs, teacher, settings, seed=seed)
        return {k: v.clone() for k, v in student.state_dict().items()}

    first, again, other = run(0), run(0), run(1)

    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
    assert torch.equal(first["encoder.embeddings.word_embeddings.weight"], start["encoder.embeddings.word_embeddings.weight"])
    assert not student.training
    assert all(p.requires_grad and p.grad is None for p in student.parameters())


def test_loss_is_zero_for_equal_logits_and_positive_otherwise() -> None:
    logits = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))

    same = distillation_loss(logits, logits.clone(), temperature=2.0)
    different = distillation_loss(logits, logits.flip(1), temperature=2.0)

    assert same.item() == pytest.approx(0.0, abs=1e-7)
    assert different.item() > 1e-3


def test_fitted_heads_agree_with_the_teacher_more_than_random_ones() -> None:
    student, inputs, teacher = setup()

    def agreement(domain: str) -> float:
        predicted = student_logits(student, domain, inputs[domain]).argmax(dim=1)
        return (predicted == teacher[domain].argmax(dim=1)).float().mean().item()

    before = {d: agreement(d) for d in LABELS}
    fit_heads_to_teacher(student, inputs, teacher, ["legal"])
    after = {d: agreement(d) for d in LABELS}

    assert after["legal"] > before["legal"] and after["legal"] >= 0.8
    assert after["bio"] == before["bio"]  # a head not named is left alone


def test_bad_shapes_and_settings_are_refused_with_the_values() -> None:
    student, inputs, teacher = setup()
    settings = DistillSettings(steps=1)

    with pytest.raises(ValueError, match=r"domain 'bio'.*39 rows"):
        distill(student, {**inputs, "bio": inputs["bio"].subset(range(39))}, teacher, settings, seed=0)
    with pytest.raises(ValueError, match=r"domain 'legal'.*3 columns.*4 outputs"):
        distill(student, inputs, {**teacher, "legal": teacher["legal"][:, :3]}, settings, seed=0)
    with pytest.raises(ValueError, match=r"temperature 0\.0: expected a number > 0"):
        DistillSettings(steps=1, temperature=0.0)
    with pytest.raises(ValueError, match=r"steps 0: expected"):
        DistillSettings(steps=0)
    with pytest.raises(ValueError, match=r"temperature -1"):
        kl_to_teacher(student, inputs, teacher, temperature=-1)
