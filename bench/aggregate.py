"""Benchmark: weighted mean of N client states held as Flower ArrayRecords, fedmerge's StreamingMean vs Flower's
``strategy_utils.aggregate_arrayrecords``, against this machine's streaming memory bandwidth; and every merge rule
of ``strategies.rules`` on the same replies, next to FedAvg, with the bytes a client uploads for it.

Clients are a randomly initialised BERT state (built once from a config) plus per-client noise, each wrapped as the
server holds a reply: RecordDict({"arrays": ArrayRecord, "metrics": MetricRecord({"num-examples": n})}).
Three ways to average them are timed on the same records:
  flower       aggregate_arrayrecords(records, "num-examples") -> ArrayRecord
  ours         zero-copy views of the .npy bytes (strategies.flower.records) -> StreamingMean -> ArrayRecord(keep_input=False),
               what the strategy does (same input and output as flower)
  ours-kernel  zero-copy views of each Array's .npy bytes -> StreamingMean -> dict (the arithmetic alone)
Each rule merges as the server does (``strategies.flower.strategy.RuleStrategy``): views of every reply -> ``Rule.merge``
(checks included) -> ArrayRecord(keep_input=False). Clients that send statistics all send the same Fisher (squared
noise for every float weight but the word embeddings, frozen by default) and the same Grams (the mean x x^T of
random inputs, one per linear layer): what merging costs does not depend on their values.
Peak extra memory is peak RSS during the call (VmHWM, reset through /proc/self/clear_refs) minus RSS before it,
after gc and malloc_trim: torch allocations are invisible to tracemalloc.

    python bench/aggregate.py [--small] [--rules fedavg,ties,...] [--out FILE]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from emit import emit_json
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from torch import nn
from transformers import BertConfig, BertModel

from strategies.aggregation import weighted_mean
from strategies.flower.records import record_views
from strategies.rules import RULES, RuleSetting, settings
from strategies.update import ClientUpdate, MergeContext, ServerText

MODELS = {
    "minilm-l6": BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, vocab_size=30522),
    "bert-base": BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, vocab_size=30522),
}
CLIENT_COUNTS = (2, 8, 32)
RSS_LIMIT = 12e9  # bytes; the machine is shared, so a case that would need more is skipped
REPEATS = 3  # best-of for times, worst-of for memory
SLOW_S = 5.0  # a rule whose first merge takes longer is timed once
STREAM_ELEMENTS = 64 * 2**20  # 256 MB per float32 operand: far beyond any cache
GB = 1e9
MB = 2**20
LIBC = ctypes.CDLL("libc.so.6")


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def measure(fn: Callable[[], object]) -> tuple[float, float]:
    """(seconds, peak extra RSS in MiB) of one call; its result is kept alive until the peak is read."""
    gc.collect()
    LIBC.malloc_trim(0)
    before = status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    peak = status_mb("VmHWM")
    del result
    return seconds, peak - before


class Streaming:
    """This machine's streaming bandwidth: c = a + b over arrays far larger than the caches, counting the bytes read
    (a and b). numpy uses one thread, torch its pool; the faster of the two is the yardstick."""

    def __init__(self) -> None:
        self.a, self.b, self.c = (np.full(STREAM_ELEMENTS, v, dtype=np.float32) for v in (1.0, 2.0, 0.0))
        self.bytes_read = self.a.nbytes + self.b.nbytes

    def numpy_add(self) -> None:
        np.add(self.a, self.b, out=self.c)

    def torch_add(self) -> None:
        torch.add(torch.from_numpy(self.a), torch.from_numpy(self.b), out=torch.from_numpy(self.c))


def client_records(config: BertConfig, count: int) -> tuple[list[RecordDict], int, dict[str, torch.Tensor]]:
    """``count`` replies (base state + noise of std 0.01, distinct num-examples), the model's float32 bytes, the base."""
    torch.manual_seed(0)
    base = {f"encoder.{k}": v for k, v in BertModel(config).state_dict().items()}  # keyed as the server's states are
    records = []
    for i in range(count):
        generator = torch.Generator().manual_seed(i + 1)
        noisy = {k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in base.items()}
        metrics = MetricRecord({"num-examples": 100 + 37 * i})
        records.append(RecordDict({"arrays": ArrayRecord(noisy), "metrics": metrics}))
        del noisy
    return records, sum(v.nbytes for v in base.values()), base


def statistics_records(config: BertConfig, base: dict[str, torch.Tensor]) -> dict[str, ArrayRecord]:
    """The Fisher and the Grams every client sends in the rule cases (see the module docstring)."""
    generator = torch.Generator().manual_seed(1)
    fisher = {k: 1e-5 * torch.rand(v.shape, generator=generator) ** 2 for k, v in base.items() if v.is_floating_point() and "word_embeddings" not in k}
    grams = {}
    for name, module in BertModel(config).named_modules():
        if isinstance(module, nn.Linear):
            x = torch.randn(module.in_features + 16, module.in_features, generator=generator)
            grams[f"encoder.{name}.weight"] = x.T @ x / len(x)
    return {"fisher": ArrayRecord(fisher), "gram": ArrayRecord(grams)}


Text = tuple[ServerText, list[dict[str, torch.Tensor]]]  # server text, and the head each domain's clients send


def merge_with(setting: RuleSetting, base: dict[str, torch.Tensor], records: list[RecordDict], num_heads: int, text: Text | None = None) -> ArrayRecord:
    """What the server does with a round's replies for ``setting``'s rule; a rule that learns from server text
    (AdaMerging) gets it, and client i the head of domain i % 2, as clients send their own head."""
    statistic = setting.rule.statistic
    heads = text[1] if text else [{}, {}]
    updates = [
        ClientUpdate(f"client {i}", f"c{i}", {**record_views(r["arrays"]), **heads[i % 2]}, float(r["metrics"]["num-examples"]),
                     record_views(r[statistic.name]) if statistic else {})
        for i, r in enumerate(records)
    ]
    start = {**base, **heads[0], **heads[1]}
    merged = dict(start)
    merged.update(setting.merge(start, updates, MergeContext(num_heads=num_heads, server_text=text[0] if text else None)))
    return ArrayRecord(merged, keep_input=False)


def bench_server_text(config: BertConfig) -> Text:
    """Two domains of unlabelled text (random token ids, 2 batches of 16 x 64 tokens each) and the model that reads them."""
    from fl.data.batches import Encoded
    from fl.modeling.model import MultiHeadEncoder
    from fl.modeling.server_text import server_text

    model = MultiHeadEncoder(BertModel(config), {"d0": 3, "d1": 3})
    heads = [{k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(f"heads.d{d}.")} for d in range(2)]
    generator = torch.Generator().manual_seed(2)
    ids = tuple(tuple(int(t) for t in torch.randint(1000, config.vocab_size, (64,), generator=generator)) for _ in range(32))
    texts = {f"d{d}": Encoded(ids, torch.zeros(32, dtype=torch.long), 0) for d in range(2)}
    return server_text(model, texts, batches=2, batch_size=16), heads


def upload_bytes(record: RecordDict, stats: dict[str, ArrayRecord]) -> dict[str, int]:
    """Bytes one client sends per round: its weights, and the statistic of each rule that needs one."""
    sizes = {"weights": sum(len(a.data) for a in record["arrays"].values())}
    sizes.update({name: sum(len(a.data) for a in values.values()) for name, values in stats.items()})
    return sizes


def rule_cases(
    config: BertConfig, records: list[RecordDict], base: dict[str, torch.Tensor], model_bytes: int, stats: dict[str, ArrayRecord], rules: list[str]
) -> dict[str, object]:
    """Per rule: best time and worst peak extra memory of a server merge, and both relative to FedAvg's."""
    with_stats = [RecordDict({**{k: r[k] for k in ("arrays", "metrics")}, **stats}) for r in records]
    found: dict[str, dict[str, float]] = {}
    for setting in settings(rules, {}):
        times, peaks = [], []
        text = bench_server_text(config) if setting.rule.server_text else None  # built once, outside the timed merges
        for _ in range(REPEATS):
            seconds, peak_mb = measure(lambda: merge_with(setting, base, with_stats, config.num_attention_heads, text))
            times.append(seconds)
            peaks.append(peak_mb)
            if seconds > SLOW_S:
                break
        found[setting.name] = {"time_s": round(min(times), 4), "peak_extra_model_copies": round(max(peaks) * MB / model_bytes, 2), "runs": len(times)}
    if "fedavg" in found:
        for entry in found.values():
            entry["over_fedavg_time"] = round(entry["time_s"] / found["fedavg"]["time_s"], 2)
            entry["extra_copies_over_fedavg"] = round(entry["peak_extra_model_copies"] - found["fedavg"]["peak_extra_model_copies"], 2)
    return {"rules": found, "upload_bytes_per_client": upload_bytes(records[0], stats)}


def flower(records: list[RecordDict]) -> ArrayRecord:
    return aggregate_arrayrecords(records, "num-examples")


def ours(records: list[RecordDict]) -> ArrayRecord:
    states = ((record_views(r["arrays"]), float(r["metrics"]["num-examples"])) for r in records)
    return ArrayRecord(weighted_mean(states), keep_input=False)  # frees each sum as soon as it is encoded


def ours_kernel(records: list[RecordDict]) -> dict[str, torch.Tensor]:
    states = ((record_views(r["arrays"]), float(r["metrics"]["num-examples"])) for r in records)
    return weighted_mean(states)


METHODS = {"flower": flower, "ours": ours, "ours-kernel": ours_kernel}


def max_abs_diff(a: ArrayRecord, b: ArrayRecord) -> float:
    return max(float(np.abs(a[k].numpy() - b[k].numpy()).max()) for k in a)


def run_case(model: str, records: list[RecordDict], model_bytes: int, streaming: Streaming) -> dict[str, object]:
    """Best-of-REPEATS time and worst peak memory of each method, with the streaming bandwidth measured in between,
    so that every figure of the case shares whatever load the (shared) machine had."""
    bytes_read = sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for r in records for a in r["arrays"].values())
    stream_names = ("numpy_add", "torch_add")
    times: dict[str, list[float]] = {name: [] for name in (*stream_names, *METHODS)}
    peaks: dict[str, list[float]] = {name: [] for name in METHODS}
    for _ in range(REPEATS):
        for name in stream_names:
            times[name].append(measure(getattr(streaming, name))[0])
        for name, fn in METHODS.items():
            seconds, peak_mb = measure(lambda: fn(records))
            times[name].append(seconds)
            peaks[name].append(peak_mb)
    stream_gbps = {name: streaming.bytes_read / min(times[name]) / GB for name in stream_names}
    reference = max(stream_gbps.values())
    case: dict[str, object] = {
        "model": model,
        "clients": len(records),
        "model_mb": round(model_bytes / MB, 1),
        "bytes_read": bytes_read,
        "streaming_gbps": {name: round(gbps, 2) for name, gbps in stream_gbps.items()},
    }
    for name in METHODS:
        best = min(times[name])
        case[name] = {
            "time_s": round(best, 4),
            "gbps": round(bytes_read / best / GB, 2),
            "fraction_of_streaming": round(bytes_read / best / GB / reference, 3),
            "peak_extra_mb": round(max(peaks[name]), 1),
            "peak_extra_model_copies": round(max(peaks[name]) * MB / model_bytes, 2),
        }
    case["ours_over_flower_time"] = round(min(times["ours"]) / min(times["flower"]), 3)
    case["ours_kernel_over_flower_time"] = round(min(times["ours-kernel"]) / min(times["flower"]), 3)
    case["max_abs_diff_ours_vs_flower"] = max_abs_diff(ours(records), flower(records))
    return case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="only the smallest case (smoke test)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--rules", default=",".join(r for r in RULES if r != "fedprox"),
                        help="rules to time next to fedavg ('' for none; fedprox merges exactly as fedavg)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 1 because numpy (Flower's helper) uses "
                        "one, and torch's thread pool stalls when others share this 2-core machine")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    report: dict[str, object] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "loadavg_at_start": os.getloadavg(),
                    "torch": torch.__version__, "numpy": np.__version__},
        "memory_method": "peak RSS (VmHWM after resetting it via /proc/self/clear_refs) minus RSS before the call, "
                         "after gc.collect and malloc_trim; the call's result is still alive when the peak is read",
    }
    streaming = Streaming()
    rules = [r for r in args.rules.split(",") if r]
    if rules and "fedavg" not in rules:
        rules.insert(0, "fedavg")
    cases: list[dict[str, object]] = []
    models = list(MODELS.items())[:1] if args.small else list(MODELS.items())
    for model, config in models:
        counts = CLIENT_COUNTS[:1] if args.small else CLIENT_COUNTS
        estimate = sum(p.numel() * 4 for p in BertModel(config).parameters())
        runnable = [n for n in counts if (n + 3) * estimate <= RSS_LIMIT]  # inputs + base + two working copies
        for n in counts:
            if n not in runnable:
                cases.append({"model": model, "clients": n, "skipped": f"needs about {(n + 3) * estimate / GB:.1f} GB "
                              f"({n} client records + base + 2 working copies of {estimate / MB:.0f} MiB) > {RSS_LIMIT / GB:.0f} GB"})
        if not runnable:
            continue
        records, model_bytes, base = client_records(config, max(runnable))
        stats = statistics_records(config, base)
        for n in runnable:
            case = run_case(model, records[:n], model_bytes, streaming)
            if rules:
                case.update(rule_cases(config, records[:n], base, model_bytes, stats, rules))
            cases.append(case)
        del records
    report["cases"] = sorted(cases, key=lambda c: (list(MODELS).index(c["model"]), c["clients"]))
    report["loadavg_at_end"] = os.getloadavg()
    report["total_s"] = round(time.perf_counter() - started, 1)
    emit_json(report, args.out)


if __name__ == "__main__":
    main()
