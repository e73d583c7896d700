"""Tokenise a domain's texts once and cut them into padded batches.

Tokenising up front (without padding) and padding each batch only to its own longest sequence keeps
short biomedical definitions cheap next to long licence texts.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Encoded:
    """Token ids per example (unpadded) and the labels, ready for batching."""

    input_ids: tuple[tuple[int, ...], ...]
    labels: torch.Tensor
    pad_id: int

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, indices: Sequence[int] | np.ndarray) -> Encoded:
        """The examples at ``indices``: the same as encoding their texts alone (each text is tokenised on its own)."""
        idx = np.asarray(indices, dtype=np.int64)
        return Encoded(tuple(self.input_ids[i] for i in idx), self.labels[torch.from_numpy(idx)], self.pad_id)


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def encode(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], labels: Sequence[int], max_length: int) -> Encoded:
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return Encoded(tuple(tuple(x) for x in ids), torch.tensor(np.array(labels), dtype=torch.long), pad)


def collate(data: Encoded, indices: Sequence[int]) -> Batch:
    rows = [data.input_ids[i] for i in indices]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), data.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.as_tensor(row)
        mask[i, : len(row)] = 1
    return Batch(input_ids, mask, data.labels[list(indices)])


def training_batches(size: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Endless shuffled epochs of index batches, deterministic by seed."""
    if size < 1:
        raise ValueError("cannot draw training batches from an empty dataset")
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(size)
        for start in range(0, size, batch_size):
            yield order[start : start + batch_size]


def length_sorted_batches(data: Encoded, batch_size: int) -> Iterator[np.ndarray]:
    """Index batches of similar length, for fast evaluation (results are put back in order by the caller)."""
    order = np.argsort([len(x) for x in data.input_ids], kind="stable")
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]
