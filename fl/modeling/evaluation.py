"""Scoring a multi-head model on a domain's held-out set.

Every score keeps the per-example correctness, so that ``fl.report`` can bootstrap intervals over test
examples, and differences between two models on the same examples paired.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fl.data.batches import Encoded, collate, length_sorted_batches
from fl.modeling.model import MultiHeadEncoder

EVAL_BATCH = 64


@dataclass(frozen=True)
class Score:
    accuracy: float
    macro_f1: float
    loss: float
    correct: np.ndarray  # bool per test example, in test-set order

    def summary(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "macro-f1": self.macro_f1, "loss": self.loss}

    def to_record(self) -> dict[str, float | str]:
        """JSON for a checkpoint: the summary and the per-example correctness as a string of 0s and 1s."""
        return {**self.summary(), "correct": "".join("1" if c else "0" for c in self.correct)}

    @classmethod
    def from_record(cls, record: dict[str, float | str]) -> Score:
        correct = np.frombuffer(str(record["correct"]).encode(), dtype=np.uint8) == ord("1")
        return cls(float(record["accuracy"]), float(record["macro-f1"]), float(record["loss"]), correct)


Scores = Mapping[str, Score]  # one model's score on each domain, by domain name


def macro_f1(labels: np.ndarray, predictions: np.ndarray) -> float:
    """Macro-F1 over the classes present in labels or predictions (sklearn's default)."""
    classes = np.union1d(labels, predictions)
    scores = []
    for c in classes:
        tp = np.sum((predictions == c) & (labels == c))
        fp = np.sum((predictions == c) & (labels != c))
        fn = np.sum((predictions != c) & (labels == c))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def score_logits(logits: torch.Tensor, labels: torch.Tensor) -> Score:
    loss = nn.functional.cross_entropy(logits, labels).item()
    predictions = logits.argmax(dim=1).numpy()
    truth = labels.numpy()
    correct = predictions == truth
    return Score(float(correct.mean()), macro_f1(truth, predictions), loss, correct)


@torch.no_grad()
def per_example(data: Encoded, width: int, compute: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``compute(input_ids, attention_mask)`` over length-sorted batches (CPU tensors; the model moves them), one row
    per example back in data order, on the CPU: features or logits of any model, padded as little as possible."""
    out = torch.empty(len(data), width)
    for idx in length_sorted_batches(data, EVAL_BATCH):
        batch = collate(data, idx)
        out[torch.as_tensor(idx)] = compute(batch.input_ids, batch.attention_mask).cpu()
    return out


def pooled_features(model: MultiHeadEncoder, data: Encoded) -> torch.Tensor:
    """Mean-pooled encoder output for every example, in data order, on the CPU whatever the model's device."""
    model.eval()
    return per_example(data, model.heads[model.domains[0]].in_features, model.embed)


def evaluate(model: MultiHeadEncoder, domain: str, data: Encoded) -> Score:
    with torch.no_grad():
        logits = model.heads[domain](pooled_features(model, data).to(model.device)).cpu()
    return score_logits(logits, data.labels)
