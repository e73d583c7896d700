"""Wall time per phase of a run, logged as each phase starts and ends (the progress a long run shows)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


class PhaseClock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        log.info("== phase: %s", name)
        tick = time.monotonic()
        yield
        self.seconds[name] = round(time.monotonic() - tick, 2)
        log.info("== phase %s done in %.1f s", name, self.seconds[name])
