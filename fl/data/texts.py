"""``LabeledTexts``: the value every data source returns (an embedded source, a user's file, a Hugging Face dataset)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class LabeledTexts:
    """Texts with integer labels; ``groups`` (optional) keys examples that must stay on one side of a split.

    ``eq=False``: equality of a numpy field is ambiguous, so instances compare by identity. The labels
    array is made read-only because cached instances are shared between callers.
    """

    texts: tuple[str, ...]
    labels: np.ndarray
    label_names: tuple[str, ...]
    groups: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        labels = np.array(self.labels, dtype=np.int64)
        labels.setflags(write=False)
        object.__setattr__(self, "labels", labels)
        if labels.ndim != 1 or len(labels) != len(self.texts):
            raise ValueError(
                f"labels must be 1-D with one entry per text, got shape {labels.shape} for {len(self.texts)} texts"
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.label_names)):
            raise ValueError(f"labels must lie in [0, {len(self.label_names)}), got [{labels.min()}, {labels.max()}]")
        if self.groups is not None and len(self.groups) != len(self.texts):
            raise ValueError(f"groups must have one entry per text, got {len(self.groups)} for {len(self.texts)} texts")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int] | np.ndarray) -> LabeledTexts:
        """The examples at ``indices``, in that order; label ids and names stay as they are."""
        idx = np.asarray(indices, dtype=np.int64)
        return LabeledTexts(
            texts=tuple(self.texts[i] for i in idx),
            labels=self.labels[idx],
            label_names=self.label_names,
            groups=None if self.groups is None else tuple(self.groups[i] for i in idx),
        )
