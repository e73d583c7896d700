"""Abandon the client of a message that a round gave up on, so the round ends at its reply timeout.

Flower's simulation engine waits on each client's Ray task with a plain ``ray.get``: a client asleep past the reply
timeout holds one of its worker threads, one actor, and with them the end of the whole run, until it wakes up (a run
whose server gave up after 20 s exited 328 s later). While a simulation runs, ``ActorWatch`` stands in for Flower's
actor pool class to learn which actor runs which message, and kills the actor of every message the strategy gave up
on. The actors are created restartable (``RESTARTABLE``): Ray starts a fresh one in its place, so the pool keeps its
size and the remaining clients keep their actors.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

RESTARTABLE = {"max_restarts": 1000}  # actor options: Ray replaces a killed actor (a killed task is not retried)


class ActorWatch:
    """Which actor runs which message (by Flower message id), for the messages still running."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # Flower's engine submits and collects from one thread per actor
        self.running: dict[str, Any] = {}  # message id -> the actor handle running it
        self.message_of: dict[Any, str] = {}  # the task's future -> its message id
        self.killed: set[str] = set()  # hex ids of the actors killed

    def started(self, message_id: str, future: Any, actor: Any) -> None:
        with self.lock:
            self.running[message_id] = actor
            self.message_of[future] = message_id

    def ended(self, future: Any) -> None:
        with self.lock:
            self.running.pop(self.message_of.pop(future, ""), None)

    def abandon(self, message_ids: Iterable[str]) -> int:
        """Kill (for Ray to restart) the actors running these messages; returns how many were still running."""
        import ray

        with self.lock:
            actors = [self.running.pop(m) for m in set(message_ids) if m in self.running]
        for actor in actors:
            self.killed.add(actor._actor_id.hex())
            ray.kill(actor, no_restart=False)
        if actors:
            log.warning("abandoned %d client task(s) past the reply timeout: their actors are restarted", len(actors))
        return len(actors)

    def abandon_all(self) -> int:
        """Kill whatever still runs when the server is done: the run's end does not wait for it."""
        with self.lock:
            running = list(self.running)
        return self.abandon(running)

    def pool_class(self) -> type:
        """Flower's actor pool, telling this watch what each actor runs."""
        from flwr.simulation.ray_transport.ray_actor import BasicActorPool

        watch = self

        class WatchedActorPool(BasicActorPool):
            def submit(self, actor_fn: Any, job: Any) -> Any:
                future = super().submit(actor_fn, job)
                watch.started(job[1].metadata.message_id, future, self._future_to_actor[future])
                return future

            def add_actor_back_to_pool(self, future: Any) -> None:
                watch.ended(future)
                super().add_actor_back_to_pool(future)

        return WatchedActorPool

    def filter(self, record: logging.LogRecord) -> bool:
        """A logging filter for Flower's logger: the errors its engine logs for the tasks of killed actors (one line
        and a traceback each) are expected, and the warning of ``abandon`` says what happened."""
        if not self.killed or record.levelno < logging.ERROR:
            return True
        text = record.getMessage()
        return text != "An exception was raised when processing a message by RayBackend" and not any(a in text for a in self.killed)


@contextmanager
def watched_actors() -> Iterator[ActorWatch]:
    """An ActorWatch over the simulations started inside the block (Flower's Ray backend builds its pool from the
    class this swaps in; one simulation runs at a time in a process)."""
    from flwr.server.superlink.fleet.vce.backend import raybackend

    watch = ActorWatch()
    original = raybackend.BasicActorPool
    raybackend.BasicActorPool = watch.pool_class()  # type: ignore[misc]
    flower = logging.getLogger("flwr")
    flower.addFilter(watch)
    try:
        yield watch
    finally:
        raybackend.BasicActorPool = original  # type: ignore[misc]
        flower.removeFilter(watch)
