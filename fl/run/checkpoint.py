"""Checkpoints after every completed round, so that a killed run continues where it stopped (``--resume``).

Flower does not resume a run from a round (adap/flower #599); this module keeps, in the run folder:

    checkpoints/run.json                       what was run (config, strategies, their hash): --resume must match
    checkpoints/baselines.json                 every baseline's scores, with per-example correctness
    checkpoints/start.safetensors              the strategies' common start (the base encoder with its probe heads)
    checkpoints/<strategy>/state.json          last completed round, central scores per round, strategy state
    checkpoints/<strategy>/round-<K>.safetensors   the global weights after round K

Every file is written under a temporary name and renamed (``fl.run.files``), weights before the state that names
them, and an older round's weights are removed only after that: a crash at any instant leaves the previous
checkpoint loadable. Nothing else is needed to reproduce the next round: clients derive their seeds from the
run's seed and the round number, and the rules' randomness from the seed, round and client name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from fl.modeling.evaluation import Score, Scores
from fl.run import files
from fl.run.config import ConfigError, RunConfig
from strategies.rules import RuleSetting

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
RESULT_FILES = ("results.json", "results.md", "curves.png", "transfer.png")
T = TypeVar("T")


def run_identity(config: RunConfig, strategies: Sequence[RuleSetting]) -> dict[str, object]:
    """What a resumed run must share with the run it continues, and its hash."""
    identity: dict[str, object] = {
        "config": config.to_record(),
        "strategies": [[s.name, s.record()] for s in strategies],
    }
    identity["hash"] = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return identity


def changes(saved: Mapping[str, object], now: Mapping[str, object]) -> list[str]:
    """The options that differ between two identities, as 'key old -> new'."""
    old_config, new_config = dict(saved["config"]), dict(now["config"])  # type: ignore[call-overload]
    found = [
        f"{key} {old_config.get(key, '(unset)')} -> {new_config.get(key, '(unset)')}"
        for key in sorted(set(old_config) | set(new_config))
        if old_config.get(key) != new_config.get(key)
    ]
    if saved["strategies"] != now["strategies"]:
        found.append(f"strategies {strategy_text(saved)} -> {strategy_text(now)}")
    return found


def strategy_text(identity: Mapping[str, object]) -> str:
    return ",".join(
        name + "".join(f":{k}={v}" for k, v in sorted(values.items())) for name, values in identity["strategies"]  # type: ignore[union-attr]
    )


def writable_folder(out: Path) -> None:
    """Refuse an --out that is a file or lies where this user cannot write, before any work."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, expected a folder")
    existing = next(p for p in [out, *out.absolute().parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: cannot write in {existing}")


def check_out(out: Path, identity: Mapping[str, object], resume: bool, overwrite: bool) -> None:
    """Refuse, in one line, a run that would overwrite earlier results silently or resume something else."""
    writable_folder(out)
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite: expected one of them")
    used = (out / CHECKPOINTS).exists() or any((out / name).exists() for name in RESULT_FILES)
    if resume:
        saved = out / CHECKPOINTS / "run.json"
        if not saved.exists():
            raise ConfigError(f"--resume: {out} holds no checkpoint to resume (expected {saved})")
        changed = changes(check_resumable(out), identity)
        if changed:
            raise ConfigError(f"--resume: the configuration differs from the run in {out}: {'; '.join(changed)}")
    elif used and not overwrite:
        raise ConfigError(f"--out {out} already holds results or a checkpoint: pass --resume to continue it or --overwrite to replace it")


def readable(path: Path, read: Callable[[Path], T]) -> T:
    """``read(path)``, or one line naming the damaged file: a resumed run reads every checkpoint file before any work."""
    try:
        return read(path)
    except Exception as error:  # noqa: BLE001 - truncated, not JSON, a field missing or of the wrong type: all one answer
        reason = (str(error).splitlines() or [type(error).__name__])[0][:200]
        raise ConfigError(f"--resume: {path} is damaged ({reason}); expected the file as fedmerge wrote it, or pass --overwrite to start afresh") from None


def identity_record(path: Path) -> dict[str, object]:
    record = files.read_json(path)
    if not isinstance(record.get("config"), dict) or not isinstance(record.get("strategies"), list):
        raise ValueError("no 'config' object and 'strategies' list")
    return record


def state_record(path: Path) -> dict[str, object]:
    """A strategy's state.json, with every field ``StrategyCheckpoint.load`` reads parsed once."""
    state = files.read_json(path)
    int(state["round"])  # type: ignore[call-overload]
    scores_from(state["scores"])  # type: ignore[arg-type]
    dict(state["strategy"])  # type: ignore[call-overload]
    return state


def check_resumable(out: Path) -> dict[str, object]:
    """Every file a resumed run will read, read now (the run's identity returned): a damaged one stops the run at
    the start, in one line naming it, with nothing overwritten."""
    folder = out / CHECKPOINTS
    identity = readable(folder / "run.json", identity_record)
    if (folder / "baselines.json").exists():
        readable(folder / "baselines.json", lambda p: scores_from(files.read_json(p)["models"]))  # type: ignore[arg-type]
        readable(folder / "start.safetensors", files.load_weights)
    for path in sorted(folder.glob("*/state.json")):
        weights = readable(path, state_record).get("weights")
        if weights:
            readable(path.parent / str(weights), files.load_weights)
    return identity


@dataclass(frozen=True)
class Completed:
    """A strategy's state after its last completed round, read back from disk."""

    server_round: int
    weights: dict[str, torch.Tensor]
    scores: dict[int, Scores]  # central evaluation per round (empty without server data)
    strategy_state: dict[str, object]  # RuleStrategy.state(): client history and evaluations, sampling, robust state
    finished: bool  # the strategy's rounds are all done and its model folder is saved


def scores_record(scores: Mapping[object, Scores]) -> dict[str, dict[str, object]]:
    """Scores by round or by model name, as JSON (keys become strings)."""
    return {str(key): {d: s.to_record() for d, s in by_domain.items()} for key, by_domain in scores.items()}


def scores_from(record: Mapping[str, Mapping[str, object]]) -> dict[str, Scores]:
    return {key: {d: Score.from_record(s) for d, s in by_domain.items()} for key, by_domain in record.items()}  # type: ignore[arg-type]


class StrategyCheckpoint:
    """One strategy's checkpoints; ``save`` after every round, ``finish`` once its model folder is written."""

    def __init__(self, run: RunFolder, name: str) -> None:
        self.run = run
        self.name = name
        self.folder = run.out / CHECKPOINTS / name

    def load(self) -> Completed | None:
        path = self.folder / "state.json"
        if not path.exists():
            return None
        state = files.read_json(path)
        weights_file = state.get("weights")
        weights = files.load_weights(self.folder / str(weights_file)) if weights_file else {}
        self.run.last_round = (self.name, int(state["round"]))  # type: ignore[call-overload]
        return Completed(
            int(state["round"]),  # type: ignore[call-overload]
            weights,
            {int(r): scores for r, scores in scores_from(state["scores"]).items()},  # type: ignore[arg-type]
            dict(state["strategy"]),  # type: ignore[call-overload]
            bool(state.get("finished", False)),
        )

    def save(self, server_round: int, weights: Mapping[str, torch.Tensor], strategy: Mapping[str, object], scores: Mapping[int, Scores]) -> None:
        """Weights first, then the state that names them, then the previous round's weights go."""
        previous = self.folder / "state.json"
        old = files.read_json(previous).get("weights") if previous.exists() else None
        name = f"round-{server_round}.safetensors"
        files.save_weights(self.folder / name, weights)
        self.write_state(server_round, name, strategy, scores, finished=False)
        if old and old != name:
            (self.folder / str(old)).unlink(missing_ok=True)
        self.run.last_round = (self.name, server_round)
        log.info("checkpoint: %s round %d saved in %s", self.name, server_round, self.folder)

    def finish(self) -> None:
        """Mark the strategy done; its weights now live in its model folder, so the round file goes."""
        path = self.folder / "state.json"
        state = files.read_json(path)
        files.write_json(path, {**state, "weights": None, "finished": True})
        if state.get("weights"):
            (self.folder / str(state["weights"])).unlink(missing_ok=True)

    def write_state(
        self, server_round: int, weights: str | None, strategy: Mapping[str, object], scores: Mapping[int, Scores], finished: bool
    ) -> None:
        files.write_json(
            self.folder / "state.json",
            {
                "round": server_round,
                "weights": weights,
                "finished": finished,
                "run-hash": self.run.identity["hash"],
                "scores": scores_record(scores),
                "strategy": dict(strategy),
            },
        )


class RunFolder:
    """The run folder of one experiment: its identity, the baselines, each strategy's checkpoints, its progress."""

    def __init__(self, out: Path, identity: Mapping[str, object]) -> None:
        self.out = out
        self.identity = dict(identity)
        self.last_round: tuple[str, int] | None = None  # (strategy, round) of the newest checkpoint written or read

    def open(self, overwrite: bool = False) -> None:
        """Create the folder (clearing earlier results with `overwrite`) and record what this run is."""
        if overwrite:
            shutil.rmtree(self.out / CHECKPOINTS, ignore_errors=True)
            for name in RESULT_FILES:
                (self.out / name).unlink(missing_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        if not (self.out / CHECKPOINTS / "run.json").exists():
            files.write_json(self.out / CHECKPOINTS / "run.json", self.identity)

    def strategy(self, name: str) -> StrategyCheckpoint:
        return StrategyCheckpoint(self, name)

    def save_baselines(self, scores: Mapping[str, Scores], start: Mapping[str, torch.Tensor]) -> None:
        files.save_weights(self.out / CHECKPOINTS / "start.safetensors", start)
        record = {"run-hash": self.identity["hash"], "models": scores_record(scores)}
        files.write_json(self.out / CHECKPOINTS / "baselines.json", record)

    def baselines(self) -> tuple[dict[str, Scores], dict[str, torch.Tensor]] | None:
        """The baselines' scores and the strategies' start, when an earlier run of this folder got that far."""
        path = self.out / CHECKPOINTS / "baselines.json"
        if not path.exists():
            return None
        scores = scores_from(files.read_json(path)["models"])  # type: ignore[arg-type]
        return scores, files.load_weights(self.out / CHECKPOINTS / "start.safetensors")

    def progress(self) -> str:
        if self.last_round is None:
            return "before any strategy round completed"
        name, server_round = self.last_round
        return f"after round {server_round} of {name}"
