"""Ctrl-C and SIGTERM end a run within seconds, with no Ray or Flower process left and a line saying how to resume.

Left alone, a Ctrl-C during a Flower simulation raises in the main thread while the ServerApp's thread (not a
daemon) keeps waiting for replies, so Python hangs at exit; Ray's processes outlive a killed driver for
minutes. Here the handler says how far the run got, exits at once with 128 + the signal's number (130 for
SIGINT, 143 for SIGTERM), and a reaper it forks kills every process the run started (Ray's GCS, raylet and
workers are its descendants). That is safe because every file a run writes is renamed into place whole (``fl.run.files``):
an interrupted run leaves its last checkpoint intact.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

import psutil

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def kill_descendants_after_exit(grace: float = 5.0) -> None:
    """Fork a reaper that waits for this process to exit, then kills every process this one had started.

    Killing Ray's raylet while this process lives makes Ray's driver threads end it with exit code 1 at once,
    so the kill must come after this process's own exit. The forked child only polls and sends signals."""
    pids = [p.pid for p in psutil.Process().children(recursive=True)]
    parent = os.getpid()
    if os.fork() == 0:
        deadline = time.monotonic() + grace
        while os.getppid() == parent and time.monotonic() < deadline:
            time.sleep(0.01)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        os._exit(0)


@contextmanager
def exit_cleanly_on_signals(progress: Callable[[], str], resume_command: str) -> Iterator[None]:
    """Within the block, SIGINT/SIGTERM print "interrupted PROGRESS; resume with: COMMAND", exit 128 + the
    signal's number at once, and leave a reaper that kills the processes the run had started."""

    def handle(signum: int, _frame: FrameType | None) -> None:
        sys.stdout.flush()
        print(f"interrupted {progress()}; resume with: {resume_command}", file=sys.stderr, flush=True)
        kill_descendants_after_exit()
        os._exit(128 + signum)

    previous = {s: signal.signal(s, handle) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
