"""A test-only ClientApp that misbehaves in one way, on one client (partition 0), and a command that runs a script
with it in place of fedmerge's own (never shipped in the default path):

    python -m tests.hostile_client BEHAVIOUR sims/bio_legal.py [script options]

Every other client, and the victim's other messages, are served by fedmerge's real ClientApp.
"""

from __future__ import annotations

import runpy
import sys
import time
from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from fl.run.config import RunConfig

VICTIM = 0  # the partition id that misbehaves: bio-0 in a one-client-per-domain run


def asleep(reply: Message, msg: Message) -> Message:
    """From round 2 on: round 1 and the roll call have warmed the actors, so only this client can miss the timeout,
    however busy the machine."""
    if int(msg.content["config"]["server-round"]) >= 2:
        time.sleep(3600)  # far past any reply timeout of a test
    return reply


def missing_key(reply: Message, msg: Message) -> Message:
    state = reply.content["arrays"].to_torch_state_dict()
    del state[sorted(k for k in state if k.startswith("encoder."))[0]]
    reply.content["arrays"] = ArrayRecord(state)
    return reply


def float16(reply: Message, msg: Message) -> Message:
    state = reply.content["arrays"].to_torch_state_dict()
    key = sorted(k for k in state if k.startswith("encoder.") and state[k].is_floating_point())[-1]
    state[key] = state[key].to(torch.float16)
    reply.content["arrays"] = ArrayRecord(state)
    return reply


def metrics_as(value: object, key: str = "num-examples") -> Callable[[Message, Message], Message]:
    """Replace a metric by a value MetricRecord would refuse: the reply carries a ConfigRecord named "metrics"."""

    def hostile(reply: Message, msg: Message) -> Message:
        values = dict(reply.content["metrics"].items())
        values[key] = value
        reply.content["metrics"] = ConfigRecord(values)
        return reply

    return hostile


TRAIN = {
    "asleep": asleep,
    "missing-key": missing_key,
    "float16": float16,
    "string-metric": metrics_as("32"),
    "bool-metric": metrics_as(True, "train-loss"),
}
EVALUATE = {"string-eval-metric": metrics_as("high", "eval-accuracy")}
BEHAVIOURS = sorted({*TRAIN, *EVALUATE})


def hostile_client_app(config: RunConfig | None, behaviour: str) -> ClientApp:
    """fedmerge's ClientApp, with partition VICTIM's training (or evaluation) replies passed through `behaviour`."""
    from fl.federation.client import make_client_app

    if behaviour not in BEHAVIOURS:
        raise ValueError(f"behaviour {behaviour!r}: expected one of {', '.join(BEHAVIOURS)}")
    honest = make_client_app(config)
    app = ClientApp()

    def served(msg: Message, context: Context, hooks: dict[str, Callable[[Message, Message], Message]]) -> Message:
        reply = honest(msg, context)
        victim = int(context.node_config.get("partition-id", -1)) == VICTIM  # type: ignore[arg-type]
        return hooks[behaviour](reply, msg) if victim and behaviour in hooks else reply

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return served(msg, context, TRAIN)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return served(msg, context, EVALUATE)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return honest(msg, context)

    return app


def main(argv: list[str]) -> None:
    """Run a fedmerge script (argv[1], with argv[2:]) as `python SCRIPT`, its simulations using the hostile client."""
    import fl.federation.simulation as simulation

    behaviour, script, *options = argv
    simulation.make_client_app = lambda config=None: hostile_client_app(config, behaviour)  # type: ignore[assignment]
    sys.argv = [script, *options]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
