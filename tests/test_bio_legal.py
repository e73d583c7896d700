"""The one real-model end-to-end run: embedded MiniLM and data, both strategies, every output file."""

import json
import os
import subprocess
import sys
from pathlib import Path

from transformers import AutoModel

ROOT = Path(__file__).resolve().parents[1]
BASELINES = {"base", "bio-expert", "legal-expert", "multi-task", "one-shot-average", "ensemble"}


def test_headline_writes_results_plot_and_loadable_models(tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = ["--quick", "--train-size", "64", "--test-size", "48", "--rounds", "2", "--local-steps", "1", "--out", str(out),
            "--clients-per-domain", "2", "--clients-per-round", "3", "--repair", "distill:2"]

    done = subprocess.run(
        [sys.executable, str(ROOT / "sims" / "bio_legal.py"), *argv],
        capture_output=True,
        text=True,
        timeout=600,
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
