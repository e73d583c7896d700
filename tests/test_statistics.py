"""Client statistics on a tiny random BERT: the empirical Fisher and the Gram matrices of layer inputs."""

import pytest
import torch
from transformers import AutoModel

from fl.data.batches import Encoded, collate, training_batches
from fl.modeling.client_statistics import client_statistic, fisher_diagonal, input_grams
from fl.modeling.model import MultiHeadEncoder
from fl.modeling.train_settings import TrainSettings
from tests.conftest import tiny_bert_config


@pytest.fixture(scope="module")
def model_and_data() -> tuple[MultiHeadEncoder, Encoded]:
    torch.manual_seed(0)
    model = MultiHeadEncoder(AutoModel.from_config(tiny_bert_config(vocab_size=50)), {"bio": 3, "legal": 2})
    generator = torch.Generator().manual_seed(1)
    ids = tuple(tuple(int(t) for t in torch.randint(1, 50, (int(n),), generator=generator)) for n in torch.randint(3, 9, (12,), generator=generator))
    return model, Encoded(ids, torch.randint(0, 3, (12,), generator=generator), pad_id=0)


def test_fisher_is_the_mean_squared_per_example_gradient_of_the_trained_weights(model_and_data) -> None:
    model, data = model_and_data
    settings = TrainSettings(steps=1, batch_size=4)

    fisher = fisher_diagonal(model, "bio", data, batches=1, settings=settings, seed=0)

    # by hand, for the bio head's bias: the same 4 examples, one backward pass each
    batch = collate(data, next(training_batches(len(data), 4, 0)))
    squares = []
    for i in range(4):
        model.zero_grad()
        logits = model("bio", batch.input_ids[i : i + 1], batch.attention_mask[i : i + 1])
        torch.nn.functional.cross_entropy(logits, batch.labels[i : i + 1]).backward()
        squares.append(model.heads["bio"].bias.grad.clone() ** 2)
    assert torch.allclose(fisher["heads.bio.bias"], torch.stack(squares).mean(dim=0), atol=1e-7)
    assert "encoder.embeddings.word_embeddings.weight" not in fisher  # frozen: not trained, no Fisher
    assert "heads.legal.weight" not in fisher  # another domain's head
    assert all(bool((f >= 0).all()) for f in fisher.values())
    assert all(p.requires_grad for p in model.parameters())  # left trainable as it was


def test_grams_are_the_mean_outer_product_of_each_linear_layers_inputs_without_padding(model_and_data) -> None:
    model, data = model_and_data

    grams = input_grams(model, data, batches=2, batch_size=4, seed=3)

    linear = [n for n, m in model.encoder.named_modules() if isinstance(m, torch.nn.Linear)]
    assert set(grams) == {f"encoder.{n}.weight" for n in linear}
    query = grams["encoder.encoder.layer.0.attention.self.query.weight"]
    assert query.shape == (32, 32) and torch.allclose(query, query.T, atol=1e-6)
    # the query layer reads the embeddings' output: recompute it for the same tokens
    stream = training_batches(len(data), 4, 3)
    rows = []
    with torch.no_grad():
        for _ in range(2):
            batch = collate(data, next(stream))
            hidden = model.encoder.embeddings(input_ids=batch.input_ids)
            rows.append(hidden[batch.attention_mask.bool()])
    x = torch.cat(rows)
    assert torch.allclose(query, x.T @ x / len(x), atol=1e-5)


def test_an_unknown_statistic_is_refused(model_and_data) -> None:
    model, data = model_and_data

    with pytest.raises(ValueError, match="statistic 'hessian'"):
        client_statistic("hessian", model, "bio", data, 1, TrainSettings(steps=1), 0)
