"""Process-wide settings for Hugging Face libraries and a local Ray, applied before they are imported or started.

The embedded default and local files need no network, so a run whose sources are all local stays
offline (no hub look-ups that hang or fail behind a firewall); a run naming a hub id
(``--model org/name`` or ``hf:<dataset>``) keeps the network. Progress bars of dataset loading are
off so that an input error stays a single line. A local Ray starts its workers (the simulation's clients) at nice 0
instead of Ray's default 15: the clients are the run's work, and at nice 15 beside two busy processes each got about
5% of a core (measured with ps on this 2-core machine), so a run crawled while the machine was busy.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


def names_hub_source(argv: Sequence[str]) -> bool:
    """Whether the command line names a model or dataset that may live on a hub."""
    values = dict(zip(argv, argv[1:]))
    values.update(a.split("=", 1) for a in argv if a.startswith("--") and "=" in a)  # type: ignore[misc]
    model = values.get("--model", "default")
    hub_model = model != "default" and not Path(model).expanduser().exists() and not model.startswith((".", "/", "~"))
    domains = [v for flag, v in zip(argv, argv[1:]) if flag == "--domain"] + [a.split("=", 1)[1] for a in argv if a.startswith("--domain=")]
    hub_data = any(values.get(flag, "").startswith("hf:") for flag in ("--bio-data", "--legal-data"))
    hub_data = hub_data or any(d.partition("=")[2].startswith("hf:") for d in domains)
    return hub_model or hub_data


def configure(argv: Sequence[str]) -> None:
    """Set the environment defaults; call before importing transformers or datasets."""
    if not names_hub_source(argv):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_worker_niceness", "0")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
