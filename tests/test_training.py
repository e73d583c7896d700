"""Local training: it learns, and the FedProx term is really there after the first batch."""

from pathlib import Path

import pytest
import torch

from fl.data.batches import collate, encode
from fl.modeling.evaluation import evaluate
from fl.modeling.model import build_model, cpu_state, load_tokenizer
from fl.modeling.train_settings import TrainSettings
from fl.modeling.training import run_steps, train

TEXTS = ["the heart is large", "the kidney fails", "a bone breaks", "the heart beats fast"] * 4
LABELS = [0, 1, 2, 0] * 4


def tiny(tiny_model_dir: Path):
    model = build_model(str(tiny_model_dir), {"bio": 3}, seed=0)
    data = encode(load_tokenizer(str(tiny_model_dir)), TEXTS, LABELS, max_length=16)
    return model, data


def batch_loss(model, data) -> float:
    batch = collate(data, list(range(len(data))))
    model.eval()
    with torch.no_grad():
        logits = model("bio", batch.input_ids, batch.attention_mask)
    return torch.nn.functional.cross_entropy(logits, batch.labels).item()


def test_one_training_step_lowers_the_loss_on_a_fixed_batch(tiny_model_dir: Path) -> None:
    model, data = tiny(tiny_model_dir)
    before = batch_loss(model, data)

    train(model, [("bio", data)], TrainSettings(steps=1, batch_size=len(data), lr=1e-3, head_lr=1e-2), seed=0)

    assert batch_loss(model, data) < before


def test_fedprox_term_is_nonzero_on_second_batch_and_zero_without_mu(tiny_model_dir: Path) -> None:
    model, data = tiny(tiny_model_dir)
    start = {k: v.clone() for k, v in model.state_dict().items()}

    with_mu = train(model, [("bio", data)], TrainSettings(steps=3, batch_size=4, proximal_mu=0.5), seed=0)
    model.load_state_dict(start)
    without = train(model, [("bio", data)], TrainSettings(steps=3, batch_size=4, proximal_mu=0.0), seed=0)

    assert with_mu.proximal[0] == 0.0  # weights still equal the global ones before the first step
    assert with_mu.proximal[1] > 0.0 and with_mu.proximal[2] > 0.0
    assert without.proximal == [0.0, 0.0, 0.0]


def test_the_step_loop_hands_each_batch_with_its_indices_and_follows_the_losses_plus_the_fedprox_term(tiny_model_dir: Path) -> None:
    model, data = tiny(tiny_model_dir)
    seen = []

    def batch_loss(domain: str, logits: torch.Tensor, batch, indices) -> torch.Tensor:
        seen.append((domain, tuple(logits.shape), batch.labels.tolist(), data.labels[list(indices)].tolist()))
        return torch.nn.functional.cross_entropy(logits, batch.labels)

    report = run_steps(model, [("bio", data)], TrainSettings(steps=3, batch_size=4, proximal_mu=0.5), 0, batch_loss)

    assert [(d, shape) for d, shape, _, _ in seen] == [("bio", (4, 3))] * 3
    assert all(labels == by_index for _, _, labels, by_index in seen)
    assert report.proximal[1] > 0.0
    assert report.objectives == pytest.approx([loss + prox for loss, prox in zip(report.losses, report.proximal)], rel=1e-5)
    assert not model.training


def test_num_examples_counts_examples_not_batches(tiny_model_dir: Path) -> None:
    model, data = tiny(tiny_model_dir)

    report = train(model, [("bio", data)], TrainSettings(steps=5, batch_size=3), seed=0)

    assert report.num_examples == 15


def test_frozen_word_embeddings_stay_put(tiny_model_dir: Path) -> None:
    model, data = tiny(tiny_model_dir)
    before = model.encoder.embeddings.word_embeddings.weight.clone()

    train(model, [("bio", data)], TrainSettings(steps=2, batch_size=4, freeze_word_embeddings=True), seed=0)

    assert torch.equal(model.encoder.embeddings.word_embeddings.weight, before)


def test_an_explicit_cpu_device_trains_and_scores_bit_for_bit_as_before(tiny_model_dir: Path) -> None:
    from transformers import AutoModel

    from fl.modeling.model import MultiHeadEncoder

    settings = TrainSettings(steps=2, batch_size=4, proximal_mu=0.1)
    _, data = tiny(tiny_model_dir)
    torch.manual_seed(0)  # the model and the state copy as they were made before --device existed
    before = MultiHeadEncoder(AutoModel.from_pretrained(str(tiny_model_dir)), {"bio": 3}).float()
    on_cpu = build_model(str(tiny_model_dir), {"bio": 3}, seed=0, device="cpu")

    reports = [train(model, [("bio", data)], settings, seed=0) for model in (before, on_cpu)]
    scores = [evaluate(model, "bio", data) for model in (before, on_cpu)]
    states = [{k: v.detach().clone() for k, v in before.state_dict().items()}, cpu_state(on_cpu)]

    assert reports[0].losses == reports[1].losses and reports[0].proximal == reports[1].proximal
    assert scores[0].loss == scores[1].loss and (scores[0].correct == scores[1].correct).all()
    assert states[0].keys() == states[1].keys() and all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_linear_schedule_warms_up_then_decays_to_zero() -> None:
    from fl.modeling.training import lr_factor

    factor = lr_factor("linear", 20)

    assert factor(0) == 0.5 and factor(1) == 1.0
    assert factor(10) > factor(15) > factor(19) > 0.0
    assert lr_factor("constant", 20)(19) == 1.0
