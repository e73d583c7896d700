"""The model folder: Hugging Face format plus heads, and the base's sentence-transformers files when it has them."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModel

from fl.modeling.folder import load_merged, save_merged, sentence_files
from fl.modeling.model import MultiHeadEncoder, build_model, load_tokenizer

TEXTS = ["the heart and the kidney", "a permissive licence with a patent clause", "bone"]
LABELS = {"bio": "abc", "legal": "xy"}


def sentence_base(tiny_model_dir: Path, folder: Path, pooling: str = "mean_tokens", normalize: bool = True) -> Path:
    """The tiny BERT as a sentence-transformers model: encoder at the root, `pooling`, then Normalize or not."""
    shutil.copytree(tiny_model_dir, folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    modes = {f"pooling_mode_{m}": m == pooling for m in ["cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens"]}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **modes}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128, "do_lower_case": False}))
    (folder / "config_sentence_transformers.json").write_text(json.dumps({"__version__": {"sentence_transformers": "2.0.0"}}))
    return folder


def fedmerge_features(model: MultiHeadEncoder, folder: Path) -> torch.Tensor:
    batch = load_tokenizer(str(folder))(TEXTS, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        return model.eval().embed(batch["input_ids"], batch["attention_mask"])


def trained(model: MultiHeadEncoder) -> MultiHeadEncoder:
    """The model with every encoder weight moved, as after training: a saved folder must hold these, not the base's."""
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.encoder.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


def test_saved_model_loads_with_automodel_and_round_trips(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = build_model(str(tiny_model_dir), {"bio": 3, "legal": 2}, seed=0).eval()
    ids = torch.tensor([[101, 2000, 2001, 102]])
    mask = torch.ones_like(ids)

    save_merged(model, load_tokenizer(str(tiny_model_dir)), tmp_path / "merged", LABELS)
    plain = AutoModel.from_pretrained(tmp_path / "merged").eval()
    again, labels = load_merged(tmp_path / "merged")

    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).last_hidden_state, model.encoder(input_ids=ids).last_hidden_state)
        assert torch.allclose(again.eval()("legal", ids, mask), model("legal", ids, mask))
    assert labels == {"bio": ["a", "b", "c"], "legal": ["x", "y"]}


@pytest.mark.parametrize("normalize", [True, False])
def test_folder_of_a_sentence_transformers_base_gives_fedmerge_features_with_the_bases_normalisation(
    tiny_model_dir: Path, tmp_path: Path, normalize: bool
) -> None:
    from sentence_transformers import SentenceTransformer

    base = sentence_base(tiny_model_dir, tmp_path / "base", normalize=normalize)
    model = trained(build_model(str(base), {"bio": 3, "legal": 2}, seed=0))

    save_merged(model, load_tokenizer(str(base)), tmp_path / "merged", LABELS)
    loaded = SentenceTransformer(str(tmp_path / "merged"), device="cpu")
    embeddings = loaded.encode(TEXTS, convert_to_tensor=True)
    features = fedmerge_features(model, base)
    expected = torch.nn.functional.normalize(features, dim=-1) if normalize else features

    assert [type(m).__name__ for m in loaded] == [type(m).__name__ for m in SentenceTransformer(str(base), device="cpu")]
    assert (embeddings - expected).abs().max().item() <= 1e-5
    assert (embeddings - SentenceTransformer(str(base), device="cpu").encode(TEXTS, convert_to_tensor=True)).abs().max().item() > 1e-3


def test_folder_saved_from_a_saved_folder_keeps_the_sentence_transformers_files(tiny_model_dir: Path, tmp_path: Path) -> None:
    base = sentence_base(tiny_model_dir, tmp_path / "base")
    save_merged(build_model(str(base), {"bio": 3, "legal": 2}, seed=0), load_tokenizer(str(base)), tmp_path / "expert", LABELS)
    expert, labels = load_merged(tmp_path / "expert")

    save_merged(expert, load_tokenizer(str(base)), tmp_path / "repaired", labels)

    assert sentence_files(tmp_path / "repaired") == sentence_files(base) != []


def test_base_without_modules_json_writes_no_sentence_transformers_files(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = build_model(str(tiny_model_dir), {"bio": 3, "legal": 2}, seed=0)

    save_merged(model, load_tokenizer(str(tiny_model_dir)), tmp_path / "merged", LABELS)

    written = {p.name for p in (tmp_path / "merged").iterdir()}
    assert not written & {"modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling"}


def test_base_pooling_other_than_mean_writes_no_sentence_transformers_files_and_says_why(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base = sentence_base(tiny_model_dir, tmp_path / "base", pooling="cls_token")
    model = build_model(str(base), {"bio": 3, "legal": 2}, seed=0)

    with caplog.at_level(logging.WARNING, logger="fl.modeling.folder"):
        save_merged(model, load_tokenizer(str(base)), tmp_path / "merged", LABELS)

    assert not (tmp_path / "merged" / "modules.json").exists()
    assert "its pooling is ['cls_token']; fedmerge's encoder and heads use mean pooling" in caplog.text
