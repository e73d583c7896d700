"""LoRA clients through PEFT on a tiny model: what trains, what is sent, what is saved, and a Flower simulation."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModel

from fl.federation.rounds import CentralEvaluator, StrategyJob
from fl.federation.simulation import run_strategy
from fl.modeling.errors import ModelError
from fl.modeling.folder import load_merged, save_merged
from fl.modeling.lora import add_adapters, check_lora
from fl.modeling.model import build_model, client_state, cpu_state, load_tokenizer
from fl.modeling.peft_merges import PeftCombination, peft_merged
from fl.modeling.received import load_received
from fl.modeling.train_settings import LoraSettings, TrainSettings
from fl.modeling.training import trainable_parameters
from fl.run.config import ConfigError
from strategies.lora import client_keys, home_digest, sent_down
from strategies.rules import settings
from strategies.update import ClientUpdate, MergeContext
from tests.conftest import probed_start, tiny_run_config

LORA = LoraSettings(rank=4, dropout=0.0)
QUERY = "encoder.encoder.layer.0.attention.self.query"


def adapted_model(model_dir: Path, seed: int = 5):
    return add_adapters(build_model(str(model_dir), {"bio": 3, "legal": 3}, seed=0), LORA, seed)


def features(model, ids: torch.Tensor) -> torch.Tensor:
    return model.eval().embed(ids, torch.ones_like(ids))


def test_adapters_start_as_the_base_and_the_seed_fixes_a(tiny_model_dir: Path) -> None:
    ids = torch.randint(0, 30522, (2, 6), generator=torch.Generator().manual_seed(0))
    base = build_model(str(tiny_model_dir), {"bio": 3, "legal": 3}, seed=0)
    model, same, other = adapted_model(tiny_model_dir), adapted_model(tiny_model_dir), adapted_model(tiny_model_dir, seed=6)
    assert torch.allclose(features(model, ids), features(base, ids), atol=1e-6)
    a_key = f"{QUERY}.lora_A.default.weight"
    assert torch.equal(model.state_dict()[a_key], same.state_dict()[a_key])
    assert not torch.equal(model.state_dict()[a_key], other.state_dict()[a_key])


def test_only_the_adapters_and_the_own_head_train_and_are_sent(tiny_model_dir: Path) -> None:
    model = adapted_model(tiny_model_dir)
    trained = trainable_parameters(model, ["bio"], TrainSettings(steps=1))
    assert trained and all("lora_" in k or k.startswith("heads.bio.") for k in trained)
    assert {k for k in client_state(model, "bio")} == set(trained)
    b_only = trainable_parameters(model, ["bio"], TrainSettings(steps=1, freeze_lora_a=True))
    assert not any("lora_A" in k for k in b_only) and any("lora_B" in k for k in b_only)
    assert set(client_state(model, "bio", freeze_lora_a=True)) == set(b_only)


def test_a_target_the_encoder_lacks_is_refused_in_one_line(tiny_model_dir: Path) -> None:
    with pytest.raises(ModelError, match=r"--lora-targets query,nope: the bert encoder has no linear layer 'nope': expected some of .*query"):
        check_lora(replace(LORA, targets=("query", "nope")), str(tiny_model_dir))
    check_lora(LORA, str(tiny_model_dir))


@pytest.mark.parametrize(
    ("values", "message"),
    [({"lora_rank": 0}, "--lora-rank 0: expected an integer >= 1"), ({"peft": "qlora"}, "--peft qlora: expected one of none, lora"),
     ({"init": "permuted"}, "--init permuted with --peft lora"), ({"lora_dropout": 1.0}, "--lora-dropout 1.0: expected a probability")],
)
def test_bad_lora_options_are_refused(tiny_model_dir: Path, toy_csvs, values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny_run_config(tiny_model_dir, toy_csvs, **{"peft": "lora", **values}).validate()


def test_a_client_refuses_another_base_or_a_message_without_its_adapters(tiny_model_dir: Path) -> None:
    server, client = adapted_model(tiny_model_dir), adapted_model(tiny_model_dir)
    state = cpu_state(server)
    down = {k: state[k] for k in sent_down(state)}
    assert not any(k.startswith("encoder.") and "lora_" not in k for k in down)
    load_received(client, down, home_digest(state, down))
    with pytest.raises(ModelError, match="differ from the server's"):
        load_received(client, down, "0" * 16)
    with pytest.raises(ModelError, match="the server's message lacks"):
        load_received(client, {k: v for k, v in down.items() if "lora_B" not in k}, home_digest(state, down))


def test_frozen_word_embeddings_stay_home_both_ways(tiny_model_dir: Path) -> None:
    """Full fine-tuning with frozen word embeddings: the server sends all but them, with their hash; a client whose
    own embeddings differ (another vocabulary file, or a merge that moved them) refuses before training."""
    server = build_model(str(tiny_model_dir), {"bio": 3, "legal": 3}, seed=0)
    state = cpu_state(server)
    down = {k: state[k] for k in sent_down(state, embeddings=False)}
    assert sorted(set(state) - set(down)) == ["encoder.embeddings.word_embeddings.weight"]
    assert sent_down(state, embeddings=True) == list(state)
    client = build_model(str(tiny_model_dir), {"bio": 3, "legal": 3}, seed=1)
    load_received(client, down, home_digest(state, down), embeddings=False)
    assert all(torch.equal(v, state[k]) for k, v in cpu_state(client).items())
    moved = {**state, "encoder.embeddings.word_embeddings.weight": state["encoder.embeddings.word_embeddings.weight"] + 1}
    with pytest.raises(ModelError, match="frozen base weights .* differ from the server's"):
        load_received(client, down, home_digest(moved, down), embeddings=False)


def test_the_saved_folder_folds_the_adapters_and_holds_a_peft_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    model = adapted_model(tiny_model_dir)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, 30522, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    expected = model.eval().encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    folder = save_merged(model, load_tokenizer(str(tiny_model_dir)), tmp_path / "merged", {"bio": ["a", "b", "c"], "legal": ["x", "y", "z"]})

    folded = AutoModel.from_pretrained(folder).eval()
    assert torch.allclose(folded(input_ids=ids, attention_mask=mask).last_hidden_state, expected, atol=1e-5)
    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_model_dir), folder / "adapter").eval()
    assert torch.allclose(peft_model(input_ids=ids, attention_mask=mask).last_hidden_state, expected, atol=1e-5)
    loaded, _ = load_merged(folder)
    assert torch.allclose(features(loaded, ids), features(model, ids), atol=1e-5)


def test_peft_cat_is_the_exact_mean_update_and_lora_exact_is_peft_svd(tiny_model_dir: Path) -> None:
    model = adapted_model(tiny_model_dir)
    start, generator = cpu_state(model), torch.Generator().manual_seed(3)
    experts = {d: {k: v + 0.3 * torch.randn(v.shape, generator=generator) if "lora_" in k or k.startswith(f"heads.{d}.") else v
                   for k, v in start.items()} for d in ("bio", "legal")}
    weights = {"bio": 1.0, "legal": 3.0}
    scale = LORA.scale

    def update(state):
        return scale * state[f"{QUERY}.lora_B.default.weight"] @ state[f"{QUERY}.lora_A.default.weight"]

    def folded(merged):
        return merged[f"{QUERY}.base_layer.weight"] - start[f"{QUERY}.base_layer.weight"]

    exact = (update(experts["bio"]) + 3 * update(experts["legal"])) / 4
    assert torch.allclose(folded(peft_merged(model, start, experts, weights, PeftCombination("cat"))), exact, atol=1e-5)
    (setting,) = settings(["lora-exact"], {})
    clients = [ClientUpdate(d, d, {k: s[k] for k in client_keys(s, d)}, weights[d]) for d, s in experts.items()]
    ours = setting.merge(start, clients, MergeContext(adapter_scale=scale))
    svd = folded(peft_merged(model, start, experts, weights, PeftCombination("svd")))
    assert torch.allclose(update(ours), svd, atol=1e-5)
    assert not torch.allclose(svd, exact, atol=1e-3)  # rank 4 < the rank of the sum: the truncation is real


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir: Path, toy_csvs: tuple[Path, Path]):
    config = tiny_run_config(tiny_model_dir, toy_csvs, peft="lora", lora_rank=4)
    workbench, start, base_scores = probed_start(config, tiny_model_dir)
    return config, workbench, start, base_scores


@pytest.mark.parametrize("rule", ["lora-exact", "ffa", "ties"])  # ties: a delta rule on the updates B A
def test_a_simulation_of_lora_clients_sends_only_adapters_and_heads(lora_run, rule: str) -> None:
    config, workbench, start, base_scores = lora_run
    (setting,) = settings([rule], {})
    evaluator = CentralEvaluator(workbench.model, workbench.test_sets, rule, initial_scores=base_scores)

    outcome = run_strategy(StrategyJob(config, setting, start, evaluator))

    assert sorted(evaluator.history) == [0, 1, 2] and [len(h["clients"]) for h in outcome.client_history] == [2, 2]
    if rule != "ffa":  # merged on the updates, re-factored to the rank
        assert all(0.0 <= h["lora-energy-dropped"] < 1.0 for h in outcome.client_history)
    base_key, b_key, a_key = f"{QUERY}.base_layer.weight", f"{QUERY}.lora_B.default.weight", f"{QUERY}.lora_A.default.weight"
    assert torch.equal(outcome.final_state[base_key], start[base_key])  # the base never moves
    assert (outcome.final_state[b_key] - start[b_key]).abs().max() > 0
    assert torch.equal(outcome.final_state[a_key], start[a_key]) == (rule == "ffa")  # ffa keeps A frozen
    full = sum(v.numel() * v.element_size() for k, v in start.items() if not k.startswith("heads.legal."))
    sent = [c["bytes-sent"]["arrays"] for h in outcome.client_history for c in h["clients"]]
    assert all(s < 0.2 * full for s in sent)
