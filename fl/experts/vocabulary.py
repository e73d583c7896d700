"""One vocabulary for experts whose vocabularies differ: their overlap, the merged tokens, the merged tokenizer, and
each expert's input word embeddings remapped row by row into it, before a merge rule combines the experts.

Rows are indexed by token id, so a token's row moves with its token, not its id: two BERTs whose WordPiece
vocabularies overlap partly, or share a token at different ids, would otherwise average unrelated rows.
``--vocab first`` keeps the first expert's vocabulary (the others' tokens outside it are dropped); ``--vocab union``
appends every token only later experts have, as mergekit's ``tokenizer_source: union`` does. A row that only some
experts have is filled, for the rule, by the mean of those that have it (``fill_missing``), and a row only one
expert has is that expert's row in the result (``keep_single_source``), so text made of one expert's own tokens
is embedded exactly as that expert embeds it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import BertTokenizerFast, PreTrainedModel, PreTrainedTokenizerBase

from fl.experts.options import VOCAB_MODES

SPECIAL_TOKENS = ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class VocabularyError(ValueError):
    """Experts' vocabularies that cannot be merged as asked; the message is one line, for the command line."""


@dataclass(frozen=True)
class Overlap:
    """How far two vocabularies (token -> id) agree: whether a merge needs a remap at all, and how much is shared."""

    same_id: int  # identical token at identical id: its rows line up without a remap
    other_id: int  # token in both at different ids: a plain merge would mix this row with another token's
    only_first: int
    only_second: int

    @property
    def shared_fraction(self) -> float:
        """Tokens in both / tokens in either (1.0 for two empty vocabularies)."""
        union = self.same_id + self.other_id + self.only_first + self.only_second
        return (self.same_id + self.other_id) / union if union else 1.0

    @property
    def identical(self) -> bool:
        """Both vocabularies are the same mapping: rows line up and the tokenizer of either will do."""
        return self.other_id == self.only_first == self.only_second == 0


def overlap(first: Mapping[str, int], second: Mapping[str, int]) -> Overlap:
    """Count tokens (as from ``tokenizer.get_vocab()``) by where they occur in the two vocabularies."""
    both = first.keys() & second.keys()
    same = sum(1 for token in both if first[token] == second[token])
    return Overlap(same, len(both) - same, len(first) - len(both), len(second) - len(both))


def check_ids(vocab: Mapping[str, int], name: str = "the vocabulary") -> None:
    """Refuse ids other than exactly 0..n-1: a token's id is its embedding row and its line in vocab.txt."""
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
        raise VocabularyError(
            f"{name} has {len(ids)} tokens but ids {len(set(ids))} distinct from {ids[0] if ids else '-'} to "
            f"{ids[-1] if ids else '-'}; expected exactly 0..{len(ids) - 1}"
        )


def merged_tokens(vocabs: Sequence[Mapping[str, int]], mode: str) -> list[str]:
    """The merged vocabulary's tokens in id order: the first expert's ids never change, so ``first`` and ``union``
    agree on them and the first expert's tokenizer settings (special token ids) stay valid."""
    if mode not in VOCAB_MODES:
        raise VocabularyError(f"--vocab {mode!r}: expected {'|'.join(VOCAB_MODES)}")
    for index, vocab in enumerate(vocabs, start=1):
        check_ids(vocab, f"expert {index}'s vocabulary")
    tokens = sorted(vocabs[0], key=vocabs[0].__getitem__)
    if mode == "union":
        seen = set(tokens)
        for vocab in vocabs[1:]:
            for token in sorted(vocab, key=vocab.__getitem__):
                if token not in seen:
                    seen.add(token)
                    tokens.append(token)
    return tokens


def tokenizer_model(tokenizer: PreTrainedTokenizerBase) -> str:
    """The tokenization algorithm's name (WordPiece, BPE, Unigram, ...), or the class name of a slow non-BERT one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return type(backend.model).__name__
    return "WordPiece" if hasattr(tokenizer, "wordpiece_tokenizer") else type(tokenizer).__name__


def merged_tokenizer(tokenizers: Sequence[PreTrainedTokenizerBase], mode: str) -> PreTrainedTokenizerBase:
    """The tokenizer of the merged vocabulary, in memory (the caller saves it with ``save_pretrained``).

    ``first`` returns the first expert's tokenizer unchanged. ``union`` needs WordPiece tokenizers, whose vocabulary
    is a plain token list (a BPE vocabulary also needs its merges, which do not combine): it builds a BERT tokenizer
    on the union's vocab.txt with the first tokenizer's lower-casing and special tokens.
    """
    if mode == "union":
        for index, tokenizer in enumerate(tokenizers, start=1):
            if (kind := tokenizer_model(tokenizer)) != "WordPiece":
                raise VocabularyError(
                    f"--vocab union: expert {index}'s tokenizer is {kind}, not WordPiece; "
                    "expected WordPiece vocabularies (use --vocab first)"
                )
    tokens = merged_tokens([t.get_vocab() for t in tokenizers], mode)
    first = tokenizers[0]
    if mode == "first":
        return first
    special = {k: v for k, v in first.special_tokens_map.items() if k in SPECIAL_TOKENS}
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "vocab.txt").write_text("".join(f"{t}\n" for t in tokens), encoding="utf-8")
        # from_pretrained, not BertTokenizerFast(vocab_file=...): transformers 5 ignores that argument silently
        lower = getattr(first, "do_lower_case", True)
        union = BertTokenizerFast.from_pretrained(folder, do_lower_case=lower, **special)
    if union.get_vocab() != {t: i for i, t in enumerate(tokens)}:
        raise VocabularyError("--vocab union: the built tokenizer's vocabulary is not the merged one (spaces in a token?)")
    return union


def remap_rows(
    matrix: torch.Tensor, vocab: Mapping[str, int], tokens: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """An expert's rows (indexed by its ids) in ``tokens`` order, and which of them it has; absent rows are zeros.

    A matrix with more rows than the vocabulary is fine (some models pad the embedding); only the vocabulary's ids
    are read.
    """
    needed = max(vocab.values(), default=-1) + 1
    if matrix.shape[0] < needed:
        raise ValueError(f"embedding matrix has {matrix.shape[0]} rows but the vocabulary's ids need {needed}")
    source = torch.tensor([vocab.get(token, -1) for token in tokens], dtype=torch.long)
    present = source >= 0
    rows = matrix.new_zeros((len(tokens), *matrix.shape[1:]))
    rows[present] = matrix[source[present]]
    return rows, present


def _stacked(remapped: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    shapes = {tuple(rows.shape) for rows, _ in remapped}
    if len(shapes) != 1:
        raise ValueError(f"remapped experts' rows differ in shape: {sorted(shapes)}")
    return torch.stack([rows for rows, _ in remapped]), torch.stack([present for _, present in remapped])


def fill_missing(remapped: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """Each expert's rows with the rows it lacks set to the mean of the experts that have them: a neutral value for
    averaging-type rules, and a zero task vector against that mean for rules that subtract a base."""
    rows, present = _stacked(remapped)
    count = present.sum(dim=0)
    if not bool((count > 0).all()):
        missing = int((count == 0).nonzero()[0])
        raise ValueError(f"row {missing} of the merged vocabulary is in no expert's vocabulary")
    mask = present.reshape(*present.shape, *([1] * (rows.dim() - 2)))
    mean = (rows * mask).sum(dim=0) / count.reshape(-1, *([1] * (rows.dim() - 2))).to(rows.dtype)
    return [torch.where(m, r, mean) for r, m in zip(rows, mask)]


def keep_single_source(merged: torch.Tensor, remapped: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """A copy of ``merged`` where each row exactly one expert has is that expert's row, exactly: rules such as TIES
    or task arithmetic would otherwise rescale or trim a row that nothing else contributes to."""
    rows, present = _stacked(remapped)
    if merged.shape != rows.shape[1:]:
        raise ValueError(f"merged matrix is {tuple(merged.shape)}, the remapped rows {tuple(rows.shape[1:])}")
    single = present.sum(dim=0) == 1
    result = merged.clone()
    for expert_rows, expert_present in zip(rows, present):
        own = single & expert_present
        result[own] = expert_rows[own].to(result.dtype)
    return result


def input_embedding_key(model: PreTrainedModel) -> str:
    """The state-dict key of the input word embeddings (``embeddings.word_embeddings.weight`` for a BertModel): the
    one matrix a vocabulary remap rewrites, found by identity rather than by a name pattern per architecture."""
    weight = model.get_input_embeddings().weight
    for name, parameter in model.named_parameters():
        if parameter is weight:
            return name
    raise ValueError(f"{type(model).__name__}: no parameter is its input embeddings' weight")
