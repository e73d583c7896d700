"""Writing run files so that a crash at any instant leaves either the old version or the new one, never half.

Each file is written under a temporary name in its own folder and renamed over the old one (``os.replace`` is
atomic on POSIX and Windows within one file system). A reader, or a resumed run, therefore never sees a
truncated checkpoint, ``results.json`` or ``results.md``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


@contextmanager
def replaced(path: Path) -> Iterator[Path]:
    """A temporary path to write to; renamed to `path` when the block ends without error, removed otherwise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.partial")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    with replaced(path) as temporary:
        temporary.write_text(text)


def write_json(path: Path, payload: Mapping[str, object], default: Callable[[object], object] | None = None) -> None:
    """Strict JSON (a NaN is an error, not a token other parsers reject), written atomically."""
    write_text(path, json.dumps(payload, indent=2, default=default, allow_nan=False))


def write_results(path: Path, payload: Mapping[str, object]) -> None:
    """A results file: numpy values as numbers, anything else JSON cannot hold as its text."""
    write_json(path, payload, default=_jsonable)


def _jsonable(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def read_json(path: Path) -> dict[str, object]:
    return json.loads(path.read_text())


def save_weights(path: Path, state: Mapping[str, torch.Tensor]) -> None:
    with replaced(path) as temporary:
        save_file({k: v.detach().contiguous() for k, v in state.items()}, str(temporary))


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))
