"""The one real-model end-to-end run: embedded MiniLM and data, both strategies, every output file, and the saved
folders read back by SentenceTransformer with fedmerge's embeddings."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModel

from fl.modeling.folder import load_merged
from fl.modeling.model import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
BASELINES = {"base", "bio-expert", "legal-expert", "multi-task", "one-shot-average", "ensemble"}
TEXTS = ["Abnormality of the cardiac septa", "Permission is hereby granted, free of charge", "seizure"]


def test_headline_writes_results_plot_and_loadable_models(tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = ["--quick", "--train-size", "64", "--test-size", "48", "--rounds", "2", "--local-steps", "1", "--out", str(out),
            "--clients-per-domain", "2", "--clients-per-round", "3", "--repair", "distill:2"]

    done = subprocess.run(
        [sys.executable, str(ROOT / "sims" / "bio_legal.py"), *argv],
        capture_output=True,
        text=True,
        timeout=1800,  # a safety net: about 2 minutes on a quiet machine
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )

    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["baselines"]) == BASELINES
    for name in ["fedavg", "fedprox"]:
        rounds = results["strategies"][name]["rounds"]
        assert [r["round"] for r in rounds] == [0, 1, 2]
        assert all(0.0 <= r[d]["accuracy"] <= 1.0 for r in rounds for d in ["bio", "legal"])
        assert AutoModel.from_pretrained(out / name).config.hidden_size == 384
        for entry in results["strategies"][name]["clients"]:  # 3 of the 4 clients trained, both domains among them
            assert len(entry["sampled"]) == 3 and {c.split("-")[0] for c in entry["sampled"]} == {"bio", "legal"}
            assert sorted(c["client"].split("(")[1].rstrip(")") for c in entry["clients"]) == sorted(entry["sampled"])
    assert "| fedprox |" in (out / "results.md").read_text()
    assert set(results["repair"]["scores"]) == {"fedavg+distill", "fedprox+distill"}  # the experts distilled into each
    assert {"kl-before", "kl-after"} <= set(results["repair"]["fedavg"])
    assert "| fedavg+distill |" in (out / "results.md").read_text()
    assert AutoModel.from_pretrained(out / "fedavg+distill").config.hidden_size == 384
    assert (out / "curves.png").stat().st_size > 1000
    assert results["transfer"]["legal-expert"]["legal"] == results["baselines"]["legal-expert"]["legal"]["accuracy"]
    assert (out / "transfer.png").stat().st_size > 1000
    assert max_embedding_difference(out / "fedavg") <= 1e-5
    assert all((out / name / "modules.json").is_file() for name in ["bio-expert", "fedprox", "fedavg+distill"])


def max_embedding_difference(folder: Path) -> float:
    """SentenceTransformer(folder) against fedmerge's features of the same folder, L2-normalised as MiniLM's are."""
    from sentence_transformers import SentenceTransformer

    loaded = SentenceTransformer(str(folder), device="cpu")
    assert [type(m).__name__ for m in loaded] == ["Transformer", "Pooling", "Normalize"]
    model, _ = load_merged(folder)
    batch = load_tokenizer(str(folder))(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        features = torch.nn.functional.normalize(model.eval().embed(batch["input_ids"], batch["attention_mask"]), dim=-1)
    return (loaded.encode(TEXTS, convert_to_tensor=True) - features).abs().max().item()
