"""Merging experts with different vocabularies: overlap counts, merged tokens and tokenizer, row remapping, and a
merged tiny BERT that embeds one expert's own words exactly as that expert does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import BPE
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertModel,
    BertTokenizerFast,
    PreTrainedTokenizerFast,
)

from fl.experts.vocabulary import (
    Overlap,
    VocabularyError,
    check_ids,
    fill_missing,
    input_embedding_key,
    keep_single_source,
    merged_tokenizer,
    merged_tokens,
    overlap,
    remap_rows,
)

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
FIRST_WORDS = ["the", "cat", "dog", "sat", "mat", "##s"]
SECOND_WORDS = ["the", "dog", "cat", "ran", "far", "##s"]  # cat/dog swapped; ran/far only here
KEY = "embeddings.word_embeddings.weight"


def wordpiece(folder: Path, words: list[str]) -> BertTokenizerFast:
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(SPECIALS + words) + "\n", encoding="utf-8")
    return BertTokenizerFast.from_pretrained(folder)


@pytest.fixture()
def tokenizers(tmp_path: Path) -> tuple[BertTokenizerFast, BertTokenizerFast]:
    return wordpiece(tmp_path / "first", FIRST_WORDS), wordpiece(tmp_path / "second", SECOND_WORDS)


def test_overlap_counts_tokens_by_where_they_sit(tokenizers) -> None:
    first, second = (t.get_vocab() for t in tokenizers)

    counts = overlap(first, second)

    assert counts == Overlap(same_id=7, other_id=2, only_first=2, only_second=2)
    assert counts.shared_fraction == pytest.approx(9 / 13)
    assert not counts.identical and overlap(first, dict(first)).identical


def test_merged_tokens_keep_first_ids_and_append_later_tokens(tokenizers) -> None:
    vocabs = [t.get_vocab() for t in tokenizers]

    assert merged_tokens(vocabs, "first") == SPECIALS + FIRST_WORDS
    assert merged_tokens(vocabs, "union") == SPECIALS + FIRST_WORDS + ["ran", "far"]
    with pytest.raises(VocabularyError, match=r"'both'.*first\|union"):
        merged_tokens(vocabs, "both")
    with pytest.raises(VocabularyError, match=r"expected exactly 0\.\.1"):
        check_ids({"a": 0, "b": 2})


def test_union_tokenizer_knows_later_words_and_keeps_first_ids(tokenizers) -> None:
    first = tokenizers[0]

    union = merged_tokenizer(tokenizers, "union")

    assert merged_tokenizer(tokenizers, "first") is first
    assert union.tokenize("far") == ["far"]
    assert union("the cats sat")["input_ids"] == first("the cats sat")["input_ids"]
    assert union.get_vocab() == {t: i for i, t in enumerate(SPECIALS + FIRST_WORDS + ["ran", "far"])}


def test_union_refuses_a_bpe_tokenizer(tokenizers) -> None:
    vocab = {"<unk>": 0, "a": 1, "b": 2, "ab": 3}
    bpe = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(BPE(vocab, [("a", "b")], unk_token="<unk>")))

    with pytest.raises(VocabularyError) as error:
        merged_tokenizer([tokenizers[0], bpe], "union")

    assert str(error.value) == (
        "--vocab union: expert 2's tokenizer is BPE, not WordPiece; expected WordPiece vocabularies (use --vocab first)"
    )
    assert merged_tokenizer([tokenizers[0], bpe], "first") is tokenizers[0]


def test_remap_fill_and_keep_single_source() -> None:
    tokens = ["a", "b", "c"]
    first = remap_rows(torch.tensor([[1.0], [2.0], [9.0]]), {"b": 0, "a": 1}, tokens)  # a padded matrix
    second = remap_rows(torch.tensor([[4.0], [6.0]]), {"b": 0, "c": 1}, tokens)

    filled = fill_missing([first, second])
    merged = keep_single_source(torch.full((3, 1), 100.0), [first, second])

    assert first[0].tolist() == [[2.0], [1.0], [0.0]] and first[1].tolist() == [True, True, False]
    assert filled[0].tolist() == [[2.0], [1.0], [6.0]] and filled[1].tolist() == [[2.0], [4.0], [6.0]]
    assert merged.tolist() == [[2.0], [100.0], [6.0]]
    with pytest.raises(ValueError, match="3 rows but the vocabulary's ids need 4"):
        remap_rows(torch.zeros(3, 1), {"a": 3}, tokens)
    with pytest.raises(ValueError, match="row 2 .* no expert"):
        fill_missing([first])


def test_input_embedding_key_follows_the_model() -> None:
    config = BertConfig(vocab_size=11, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)

    assert input_embedding_key(BertModel(config)) == KEY
    assert input_embedding_key(BertForMaskedLM(config)) == f"bert.{KEY}"


def test_merged_model_embeds_an_experts_own_words_as_it_does(tokenizers) -> None:
    # the second expert is "A": its own words get new ids in the union, so the remap is what makes them match
    first_tok, a_tok = tokenizers
    config = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    torch.manual_seed(0)
    first = BertModel(BertConfig(vocab_size=len(first_tok), **config)).eval()
    a = BertModel(BertConfig(vocab_size=len(a_tok), **config)).eval()
    a_state = {k: v.clone() for k, v in first.state_dict().items()}
    a_state[KEY] = a.state_dict()[KEY].clone()
    a_state[KEY][: len(SPECIALS)] = first.state_dict()[KEY][: len(SPECIALS)]  # [CLS]/[SEP] rows alike
    a.load_state_dict(a_state)
    union_tok = merged_tokenizer(tokenizers, "union")
    tokens = [t for t, _ in sorted(union_tok.get_vocab().items(), key=lambda item: item[1])]

    remapped = [remap_rows(m.state_dict()[KEY], t.get_vocab(), tokens) for m, t in ((first, first_tok), (a, a_tok))]
    mean = torch.stack(fill_missing(remapped)).mean(dim=0)
    merged_state = dict(a_state, **{KEY: keep_single_source(mean, remapped)})
    merged = BertModel(BertConfig(vocab_size=len(tokens), **config)).eval()
    merged.load_state_dict(merged_state)

    a_ids, union_ids = (t("ran far", return_tensors="pt")["input_ids"] for t in (a_tok, union_tok))
    assert a_ids.tolist() != union_ids.tolist() and union_tok.unk_token_id not in union_ids.tolist()[0]
    with torch.no_grad():
        expected, actual = a(input_ids=a_ids).last_hidden_state, merged(input_ids=union_ids).last_hidden_state
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)
    cat = mean[union_tok.convert_tokens_to_ids("cat")]
    assert not torch.equal(cat, a_state[KEY][a_tok.convert_tokens_to_ids("cat")])  # shared rows were averaged
