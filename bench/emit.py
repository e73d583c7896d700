"""The one output rule of every benchmark: print one JSON object, and write it to --out when given."""

from __future__ import annotations

import json
from pathlib import Path


def emit_json(report: object, out: Path | None, indent: int | None = 2) -> None:
    text = json.dumps(report, indent=indent)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
