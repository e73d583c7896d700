"""Shared test setup: offline Hugging Face (no test touches a hub), tiny models and toy data."""
from pathlib import Path

from fl.run.environment import configure

configure([])

import shutil  # noqa: E402

import pytest  # noqa: E402


def tiny_bert_config(**overrides: object):
    """A 2-layer BERT small enough to train in milliseconds, with the real MiniLM vocabulary size."""
    from transformers import BertConfig

    values = dict(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    values.update(overrides)
    return BertConfig(**values)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised tiny BertModel saved with the embedded MiniLM tokenizer (no download)."""
    import torch
    from transformers import AutoModel

    from fl.modeling.model import default_model_path

    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    AutoModel.from_config(tiny_bert_config()).save_pretrained(folder)
    source = default_model_path()
    for name in ["tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"]:
        shutil.copy(source / name, folder / name)
    return folder


BIO_WORDS = ["heart", "kidney", "liver", "brain", "skin", "bone"]
LEGAL_WORDS = ["warranty", "copyleft", "patent", "permissive", "liability", "redistribution"]
FINANCE_WORDS = ["equity", "bond", "dividend", "ledger", "audit", "invoice"]  # a third domain


def write_domain_csv(path: Path, words: list[str], n: int, seed: int) -> Path:
    """A learnable toy domain: the label is the keyword the sentence mentions (3 classes)."""
    import csv
    import random

    rng = random.Random(seed)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(n):
            label = i % 3
            filler = " ".join(rng.choice(words[3:]) for _ in range(4))
            writer.writerow([f"this is about the {words[label]} and {filler}", f"class-{label}"])
    return path


@pytest.fixture(scope="session")
def toy_csvs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("toy-data")
    return (
        write_domain_csv(folder / "bio.csv", BIO_WORDS, 120, 0),
        write_domain_csv(folder / "legal.csv", LEGAL_WORDS, 120, 1),
    )


def tiny_run_config(model_dir: Path, csvs: tuple[Path, Path], **overrides: object):
    """A RunConfig of the tiny model on the toy CSVs, small enough for a Flower simulation in seconds."""
    from fl.run.config import RunConfig

    bio, legal = csvs
    values: dict[str, object] = dict(
        model=str(model_dir), bio_data=str(bio), legal_data=str(legal), train_size=60, test_size=24, max_length=16, rounds=2,
        local_steps=2, batch_size=8,
    )
    values.update(overrides)
    return RunConfig(**values)


def probed_start(config, model_dir: Path):  # noqa: ANN001, ANN201 (a RunConfig; a Workbench, a state and scores)
    """The workbench of `config` on `model_dir` with its probe heads fitted: (workbench, start state, base scores)."""
    from fl.run.domains import load_domains
    from fl.studies.baselines import fit_base, make_workbench

    workbench = make_workbench(config, str(model_dir), load_domains(config))
    start, base_scores = fit_base(workbench)
    return workbench, start, base_scores
