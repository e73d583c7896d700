"""The multi-head model: keys, client subsets, early model checks (saving: test_folder.py)."""

from pathlib import Path

import pytest
import torch

from fl.modeling.model import (
    ModelError,
    build_model,
    check_model,
    client_state,
    cpu_state,
    max_positions,
    not_an_encoder,
)


def test_state_keys_are_encoder_and_heads(tiny_model_dir: Path) -> None:
    model = build_model(str(tiny_model_dir), {"bio": 3, "legal": 2}, seed=0)

    keys = list(model.state_dict())

    assert all(k.startswith(("encoder.", "heads.bio.", "heads.legal.")) for k in keys)
    assert model.state_dict()["heads.legal.weight"].shape == (2, 32)


def test_client_state_holds_encoder_and_only_own_head(tiny_model_dir: Path) -> None:
    model = build_model(str(tiny_model_dir), {"bio": 3, "legal": 2}, seed=0)

    state = client_state(model, "bio")

    assert "heads.bio.weight" in state and "heads.legal.weight" not in state
    assert any(k.startswith("encoder.") for k in state)


def test_frozen_word_embeddings_stay_home_and_halve_a_reply(tiny_model_dir: Path, toy_csvs) -> None:
    from tests.conftest import tiny_run_config

    model = build_model(str(tiny_model_dir), {"bio": 3, "legal": 2}, seed=0)
    frozen = tiny_run_config(tiny_model_dir, toy_csvs)
    full, home = client_state(model, "bio"), client_state(model, "bio", embeddings=frozen.sends_word_embeddings)

    assert set(full) - set(home) == {"encoder.embeddings.word_embeddings.weight"}
    assert sum(v.numel() for v in home.values()) < 0.5 * sum(v.numel() for v in full.values())  # 30522 x 32 of the tiny model
    assert tiny_run_config(tiny_model_dir, toy_csvs, init="permuted").sends_word_embeddings  # each client's own permutation
    assert tiny_run_config(tiny_model_dir, toy_csvs, freeze_word_embeddings=False).sends_word_embeddings


def test_states_leaving_the_model_are_cpu_copies_that_later_training_leaves_alone(tiny_model_dir: Path) -> None:
    model = build_model(str(tiny_model_dir), {"bio": 3, "legal": 2}, seed=0, device="cpu")

    states = [cpu_state(model), client_state(model, "bio")]
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)

    for state in states:
        assert all(v.device.type == "cpu" for v in state.values())
        assert not torch.equal(state["heads.bio.weight"], model.heads["bio"].weight)


def test_model_path_without_config_is_refused_before_loading(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_text("not a model")

    with pytest.raises(ModelError, match="not a model folder"):
        check_model(str(tmp_path))


def test_default_model_resolves_offline() -> None:
    assert Path(check_model("default"), "config.json").is_file()


def test_encoders_pass_and_decoders_and_encoder_decoders_are_named() -> None:
    from transformers import BartConfig, DistilBertConfig, GPT2Config, LlamaConfig, RobertaConfig, T5Config

    from tests.conftest import tiny_bert_config

    assert [not_an_encoder(c) for c in [tiny_bert_config(), RobertaConfig(), DistilBertConfig()]] == ["", "", ""]
    assert not_an_encoder(T5Config()) == not_an_encoder(BartConfig()) == "an encoder-decoder"
    assert not_an_encoder(GPT2Config()) == not_an_encoder(LlamaConfig()) == "a decoder-only model"
    assert not_an_encoder(tiny_bert_config(is_decoder=True)) == "a decoder-only model"


def test_max_positions_leaves_out_the_positions_roberta_reserves_for_padding() -> None:
    from transformers import RobertaConfig

    from tests.conftest import tiny_bert_config

    assert max_positions(tiny_bert_config()) == 128
    assert max_positions(RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512


def test_max_length_up_to_the_positions_is_accepted(tiny_model_dir: Path) -> None:
    assert check_model(str(tiny_model_dir), max_length=128) == str(tiny_model_dir)
    with pytest.raises(ModelError, match="--max-length 129: longer than the 128 positions"):
        check_model(str(tiny_model_dir), max_length=129)


def test_a_folder_with_weights_but_no_tokenizer_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    for name in ["config.json", "model.safetensors"]:
        (tmp_path / name).write_bytes((tiny_model_dir / name).read_bytes())

    with pytest.raises(ModelError, match=r"has no tokenizer files: expected tokenizer: tokenizer\.json or vocab\.txt"):
        check_model(str(tmp_path))
