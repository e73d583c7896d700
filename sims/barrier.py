"""Loss barrier between two models of a bio_legal run, naive and after permutation alignment.

Scores both domains at evenly spaced points on the straight line (1 - t) * A + t * B between the two
full state dicts (encoder and both heads), once as saved and once with B weight-matched to A first, on
the run's own held-out test sets; writes <out>.json and <out>.png (default <run>/barrier).

    python sims/barrier.py --run runs/bio_legal                  # bio expert -> legal expert, 25 points
    python sims/barrier.py --run runs/bio_legal --a fedavg --b aligned --test-size 200
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

from fl.run.environment import configure

configure(sys.argv[1:])

from fl.run.cli import console_logging, input_checks  # noqa: E402
from fl.run.config import RunConfig  # noqa: E402

if TYPE_CHECKING:  # the model libraries load in main(), after the options are read: --help needs none of them
    import torch

    from fl.data.batches import Encoded
    from fl.modeling.evaluation import Scores
    from fl.modeling.model import MultiHeadEncoder

    State = dict[str, torch.Tensor]


class RunError(ValueError):
    """The run folder or a model folder cannot be used."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    formatter = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=formatter)
    p.add_argument("--run", required=True, help="--out folder of sims/bio_legal.py (results.json, model folders)")
    p.add_argument("--a", default="bio-expert", help="model folder inside --run at t = 0")
    p.add_argument("--b", default="legal-expert", help="model folder inside --run at t = 1 (the one aligned)")
    p.add_argument("--points", type=int, default=25, help="evenly spaced points on the path, end points included")
    p.add_argument("--test-size", type=int, default=None, help="test examples per domain (default: the run's)")
    p.add_argument(
        "--residual",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the alignment also permutes the residual stream",
    )
    p.add_argument("--out", default=None, help="output path prefix (default: <run>/barrier)")
    return p.parse_args(argv)


def model_folder(run: Path, name: str) -> Path:
    from fl.modeling.folder import HEADS_FILE, META_FILE

    folder = run / name
    missing = [f for f in ("config.json", HEADS_FILE, META_FILE) if not (folder / f).is_file()]
    if missing:
        raise RunError(f"{folder} is not a saved model folder (missing {', '.join(missing)})")
    return folder


def run_config(run: Path, test_size: int | None) -> RunConfig:
    if not run.is_dir():
        raise RunError(f"--run {run}: no such folder")
    results = run / "results.json"
    if not results.is_file():
        raise RunError(f"--run {run}: no results.json (expected the --out folder of sims/bio_legal.py)")
    record = json.loads(results.read_text()).get("config")
    if not isinstance(record, dict):
        raise RunError(f"{results} has no 'config' entry")
    known = {f.name.replace("_", "-") for f in fields(RunConfig)}  # runs before the rule registry kept rule options here
    config = RunConfig.from_record({k: v for k, v in record.items() if k in known})
    return config if test_size is None else replace(config, test_size=test_size).validate()


@dataclass(frozen=True)
class Inputs:
    """The two models and what scores them, read from a run folder."""

    config: RunConfig
    model: MultiHeadEncoder  # loaded with A; every point of both paths is scored with it
    a: State
    b: State
    test_sets: dict[str, Encoded]
    num_heads: int


def load_inputs(run: Path, name_a: str, name_b: str, test_size: int | None) -> Inputs:
    """Everything checked before any model is scored: the run, both model folders, their labels and shapes."""
    from fl.data.batches import encode
    from fl.modeling.folder import load_merged
    from fl.modeling.model import load_tokenizer, num_attention_heads
    from fl.run.domains import load_domains

    config = run_config(run, test_size)
    folders = [model_folder(run, name_a), model_folder(run, name_b)]
    data = load_domains(config)
    expected = {d: list(v.train.label_names) for d, v in data.items()}
    loaded = [load_merged(folder) for folder in folders]
    for folder, (_, labels) in zip(folders, loaded):
        if labels != expected:
            raise RunError(f"{folder} has labels {labels}, the run's data gives {expected}")
    a, b = ({k: v.detach().clone() for k, v in model.state_dict().items()} for model, _ in loaded)
    if {k: v.shape for k, v in a.items()} != {k: v.shape for k, v in b.items()}:
        raise RunError(f"{name_a} and {name_b} are not the same architecture (parameter names or shapes differ)")
    tokenizer = load_tokenizer(str(folders[0]))
    test_sets = {d: encode(tokenizer, v.test.texts, v.test.labels, config.max_length) for d, v in data.items()}
    return Inputs(config, loaded[0][0], a, b, test_sets, num_attention_heads(str(folders[0])))


def print_point(mode: str, total: int) -> Callable[[int, float, Scores], None]:
    tick = time.monotonic()

    def show(index: int, t: float, scores: Scores) -> None:
        shown = "  ".join(f"{d} loss {s.loss:.4f} acc {s.accuracy:.3f}" for d, s in scores.items())
        print(f"{mode:7s} {index + 1:2d}/{total}  t={t:.3f}  {shown}  {time.monotonic() - tick:.0f}s", flush=True)

    return show


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console_logging()
    from fl.studies.interpolation import align, barriers, curves, evaluate_path, path_points, plot_barrier

    run = Path(args.run)
    out = Path(args.out) if args.out else run / "barrier"
    started = time.monotonic()
    with input_checks(RunError) as checks:
        if args.points < 2:
            raise RunError(f"--points {args.points}: expected an integer >= 2")
        inputs = load_inputs(run, args.a, args.b, args.test_size)
    if checks.failed:
        return 2
    ts = path_points(args.points)
    seconds = {"load": round(time.monotonic() - started, 2)}

    tick = time.monotonic()
    try:
        alignment = align(inputs.a, inputs.b, inputs.num_heads, args.residual)
    except ValueError as error:  # an encoder layout strategies.permutation does not know
        print(f"error: cannot align {args.b} to {args.a}: {error}", file=sys.stderr)
        return 2
    seconds["matching"] = round(time.monotonic() - tick, 2)
    moved, units = sum(alignment.moved.values()), sum(alignment.units.values())
    print(f"matching {args.b} to {args.a}: {moved} of {units} units moved, {seconds['matching']:.1f} s")

    paths = {}
    for mode, b in [("naive", inputs.b), ("aligned", alignment.state)]:
        tick = time.monotonic()
        paths[mode] = evaluate_path(inputs.model, inputs.test_sets, inputs.a, b, ts, print_point(mode, len(ts)))
        seconds[mode] = round(time.monotonic() - tick, 2)
    found = {mode: barriers(path, ts) for mode, path in paths.items()}
    seconds["total"] = round(time.monotonic() - started, 2)

    payload = {
        "run": str(run),
        "a": args.a,
        "b": args.b,
        "config": inputs.config.to_record(),
        "residual": args.residual,
        "num-attention-heads": inputs.num_heads,
        "test-examples": {d: len(v) for d, v in inputs.test_sets.items()},
        "points": ts,
        "curves": {mode: curves(path) for mode, path in paths.items()},
        "barriers": found,
        "matching": {"moved-units": moved, "units": units, "moved-per-permutation": alignment.moved},
        "wall-seconds": seconds,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(payload, indent=2))
    sizes = ", ".join(f"{d} {len(v)}" for d, v in inputs.test_sets.items())
    plot_barrier(f"{out}.png", ts, paths, f"{args.a} (t=0) to {args.b} (t=1); test examples: {sizes}")
    for mode, per_domain in found.items():
        for domain, value in per_domain.items():
            print(
                f"{mode:7s} {domain}: loss barrier {value['loss-barrier']:.4f} "
                f"(above chord {value['loss-above-chord']:.4f}), accuracy drop {100 * value['accuracy-drop']:.1f} pts"
            )
    print(f"written {out}.json and {out}.png in {seconds['total']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
