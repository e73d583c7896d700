"""Benchmark: what running fedmerge's training through a Flower simulation costs next to a bare PyTorch loop.

The same total training (model, data, partitions, optimizer steps and seeds of ``fl.federation.client``) plus the same
central evaluation after every round is run three ways, from one start state (``make_workbench`` + ``fit_base``):

  flower           ``fl.federation.simulation.run_strategy(StrategyJob(config, FEDAVG, ...))``: Ray actors, 1 CPU (1 torch thread) per
                   client, clients in parallel; the server evaluates with ``CentralEvaluator``.
  bare-parallel    one spawned process per client with 1 torch thread, all in parallel (the CPUs Flower grants),
                   weights passed through torch.multiprocessing queues: the same work and parallelism, no Flower.
  bare-sequential  one process, clients one after another, ``--sequential-threads`` torch threads (default: all
                   cores, what a plain script gets): the simplest loop.

Every regime loads its clients' data with ``fl.federation.client.client_data`` (as a Flower client does) inside its timed
span, merges with the strategy's key-wise weighted mean, and scores the merged model on every domain's test set
with ``--eval-threads`` torch threads. The final weights of the three regimes are compared.

Flower's time is split by wall-clock timestamps: start-up (imports, Ray, actors: until the first client handler
starts), then per round dispatch, client handlers (their own receive/rebuild/train/reply; timed inside the actor
by a thin wrapper around the project's ClientApp), collect + aggregate, evaluation, and shut-down. Serialisation
(ArrayRecord build/decode, pickling as Ray does, rebuilding the client model) is timed separately on the same
weights, with one thread, and multiplied by the times it happens per round.

    python bench/overhead.py [--preset quick|default] [--local-steps N] [--small] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

from emit import emit_json

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from fl.federation.client import ClientRole, client_data, client_role, head_sizes  # noqa: E402
from fl.modeling.model import build_skeleton, client_state, resolve_model  # noqa: E402
from fl.modeling.training import train  # noqa: E402
from fl.run import seeds  # noqa: E402
from fl.run.cli import QUICK  # noqa: E402
from fl.run.config import RunConfig  # noqa: E402
from fl.run.domains import load_domains  # noqa: E402
from fl.studies.baselines import FEDAVG, Workbench, fit_base, make_workbench  # noqa: E402
from strategies.aggregation import weighted_mean  # noqa: E402

State = dict[str, torch.Tensor]
REGIMES = ("bare-parallel", "flower", "bare-sequential")
SMALL = {"train_size": 32, "test_size": 16, "max_length": 16, "rounds": 1, "local_steps": 1}


def client_seed(config: RunConfig, role: ClientRole, server_round: int) -> int:
    """The seed fl.federation.client's train handler uses (the final-weights check catches any drift from it)."""
    return seeds.client_training(config.seed, server_round, config.domains.index(role.domain), role.partition_id)


def roles(config: RunConfig) -> list[ClientRole]:
    return [client_role(config, {"partition-id": pid}) for pid in range(config.num_clients)]


def merge(global_state: Mapping[str, torch.Tensor], replies: list[tuple[State, int]]) -> State:
    """What the fedavg strategy does: key-wise weighted mean by examples trained on; unsent keys keep their value."""
    merged = dict(global_state)
    merged.update(weighted_mean((state, float(n)) for state, n in replies))
    return merged


class Stopwatch:
    """Named wall-clock spans, summed."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def time(self, name: str, fn: Callable[[], object]) -> object:
        tick = time.perf_counter()
        result = fn()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - tick
        return result


def evaluate_round(workbench: Workbench, state: State, threads: int) -> dict[str, float]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    scores = workbench.score(state)
    torch.set_num_threads(before)
    return {d: s.accuracy for d, s in scores.items()}


def bare_sequential(workbench: Workbench, start: State, threads: int, eval_threads: int) -> dict[str, object]:
    config = workbench.config
    clock = Stopwatch()
    tick = time.perf_counter()
    torch.set_num_threads(threads)
    clients = [(role, clock.time("client-data", lambda r=role: client_data(config, r))) for role in roles(config)]
    state, accuracy = dict(start), {}
    for server_round in range(1, config.rounds + 1):
        replies = []
        for role, (train_data, _, _) in clients:
            workbench.model.load_state_dict(state)
            report = clock.time("train", lambda: train(workbench.model, [(role.domain, train_data)], config.train_settings(),
                                                       client_seed(config, role, server_round)))
            replies.append((client_state(workbench.model, role.domain), report.num_examples))  # type: ignore[attr-defined]
        state = clock.time("aggregate", lambda: merge(state, replies))  # type: ignore[assignment]
        accuracy = clock.time("evaluate", lambda: evaluate_round(workbench, state, eval_threads))
    return {"total_s": time.perf_counter() - tick, "threads": threads, "parts_s": clock.seconds,
            "final_accuracy": accuracy, "final_state": state}


def _parallel_worker(config: RunConfig, role: ClientRole, index: int, inbox: mp.Queue, outbox: mp.Queue) -> None:
    """One client in its own process: 1 thread, its data loaded once, one model reused across rounds."""
    torch.set_num_threads(1)
    train_data, _, _ = client_data(config, role)
    outbox.put(("ready", index))
    model = None
    while (item := inbox.get()) is not None:
        server_round, state = item
        if model is None:
            model = build_skeleton(resolve_model(config.model), head_sizes(state))
        model.load_state_dict(state)
        tick = time.perf_counter()
        report = train(model, [(role.domain, train_data)], config.train_settings(), client_seed(config, role, server_round))
        outbox.put((index, client_state(model, role.domain), report.num_examples, time.perf_counter() - tick))


def bare_parallel(workbench: Workbench, start: State, eval_threads: int) -> dict[str, object]:
    config = workbench.config
    ctx = mp.get_context("spawn")
    tick = time.perf_counter()
    inboxes = [ctx.Queue() for _ in range(config.num_clients)]
    outbox = ctx.Queue()
    workers = [ctx.Process(target=_parallel_worker, args=(config, role, i, inboxes[i], outbox), daemon=True)
               for i, role in enumerate(roles(config))]
    for w in workers:
        w.start()
    for _ in workers:
        outbox.get(timeout=600)
    start_up = time.perf_counter() - tick
    clock = Stopwatch()
    state, accuracy, train_s = dict(start), {}, []
    try:
        for server_round in range(1, config.rounds + 1):
            round_tick = time.perf_counter()
            for inbox in inboxes:
                inbox.put((server_round, state))
            got = sorted((outbox.get(timeout=600) for _ in workers), key=lambda reply: reply[0])
            train_s.append([round(reply[3], 3) for reply in got])
            clock.seconds["clients"] = clock.seconds.get("clients", 0.0) + time.perf_counter() - round_tick
            state = clock.time("aggregate", lambda: merge(state, [(s, n) for _, s, n, _ in got]))  # type: ignore[assignment]
            accuracy = clock.time("evaluate", lambda: evaluate_round(workbench, state, eval_threads))
    finally:
        for inbox in inboxes:
            inbox.put(None)
        for w in workers:
            w.join(timeout=30)
    return {"total_s": time.perf_counter() - tick, "threads_per_client": 1, "parts_s": {"start-up": start_up, **clock.seconds},
            "train_s_per_round_per_client": train_s, "final_accuracy": accuracy, "final_state": state}


INSIDE_HANDLER = ("client_data", "receive_model", "train")  # fl.federation.client's steps, timed inside the actor


def timed_client_app(config: RunConfig):  # noqa: ANN201  (a flwr ClientApp; flwr is imported late, see flower())
    """The project's ClientApp, with each train reply carrying when its handler ran (wall clock, inside the actor)
    and how long its data loading, weight receiving (decode + model rebuild) and training took."""
    from flwr.clientapp import ClientApp

    import fl.federation.client

    app = ClientApp()

    def timed(name: str, fn: Callable[..., object], spent: dict[str, float]) -> Callable[..., object]:
        def wrapper(*args: object, **kwargs: object) -> object:
            tick = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - tick

        return wrapper

    @app.train()
    def train_handler(msg, context):  # noqa: ANN001, ANN202
        # Ray unpickles this app for every message, and a pickled closure carries a copy of its globals: so the
        # project's app is built here, in the actor, once per process, after its module's steps were wrapped.
        if not hasattr(fl.federation.client, "bench_app"):
            fl.federation.client.bench_spent = {}  # type: ignore[attr-defined]
            for name in INSIDE_HANDLER:
                setattr(fl.federation.client, name, timed(name, getattr(fl.federation.client, name), fl.federation.client.bench_spent))
            fl.federation.client.bench_app = fl.federation.client.make_client_app(config)  # type: ignore[attr-defined]
        inner, spent = fl.federation.client.bench_app, fl.federation.client.bench_spent  # type: ignore[attr-defined]
        spent.clear()
        start = time.time()
        reply = inner(msg, context)
        metrics = reply.content["metrics"]
        metrics["bench-end"] = time.time()
        metrics["bench-start"] = start
        metrics["bench-pid"] = os.getpid()
        metrics["bench-threads"] = torch.get_num_threads()
        for name in INSIDE_HANDLER:
            metrics[f"bench-{name}"] = spent.get(name, 0.0)
        return reply

    @app.query()
    def query_handler(msg, context):  # noqa: ANN001, ANN202  (the server's roll call: whom this node serves)
        return fl.federation.client.make_client_app(config)(msg, context)

    return app


def flower(workbench: Workbench, start: State, base_scores: Mapping[str, object], eval_threads: int) -> dict[str, object]:
    config = workbench.config
    tick_wall, tick = time.time(), time.perf_counter()
    import fl.federation.simulation
    from fl.federation.rounds import CentralEvaluator, StrategyJob

    import_s = time.perf_counter() - tick
    calls: list[tuple[int, float, float]] = []

    class TimedEvaluator(CentralEvaluator):
        def __call__(self, server_round, arrays):  # noqa: ANN001, ANN204
            begin = time.time()
            result = super().__call__(server_round, arrays)
            calls.append((server_round, begin, time.time()))
            return result

    evaluator = TimedEvaluator(workbench.model, workbench.test_sets, "fedavg", initial_scores=base_scores)  # type: ignore[arg-type]
    fl.federation.simulation.make_client_app = timed_client_app  # instrumentation only: the wrapper calls the project's app
    torch.set_num_threads(eval_threads)
    outcome = fl.federation.simulation.run_strategy(StrategyJob(config, FEDAVG, start, evaluator))
    end_wall = time.time()
    total = time.perf_counter() - tick

    eval_end = {r: e for r, _, e in calls}
    rounds = []
    for entry in outcome.client_history:
        r = int(entry["round"])
        starts = [float(c["bench-start"]) for c in entry["clients"]]
        ends = [float(c["bench-end"]) for c in entry["clients"]]
        begin_eval, end_eval = next((b, e) for rr, b, e in calls if rr == r)
        rounds.append({
            "round": r,
            "clients": len(entry["clients"]),
            "dispatch_s": min(starts) - eval_end[r - 1],  # round start: the previous evaluation's end
            "client_handlers_s": max(ends) - min(starts),
            "handler_s_per_client": [round(e - s, 3) for s, e in zip(starts, ends)],
            **{f"{name}_s_per_client": [float(c[f"bench-{name}"]) for c in entry["clients"]] for name in INSIDE_HANDLER},
            "actor_pid_per_client": [int(c["bench-pid"]) for c in entry["clients"]],
            "torch_threads_per_client": [int(c["bench-threads"]) for c in entry["clients"]],
            "collect_and_aggregate_s": begin_eval - max(ends),
            "evaluate_s": end_eval - begin_eval,
        })
    first_start = min(float(c["bench-start"]) for c in outcome.client_history[0]["clients"])
    rounds[0]["dispatch_s"] = None  # the first round's dispatch waits for Ray and the actors: counted as start-up
    parts = {
        "import flwr.simulation (ray)": import_s,
        "start-up (Ray, actors, first dispatch)": first_start - tick_wall - import_s,
        "dispatch": sum(r["dispatch_s"] for r in rounds[1:]),
        "client-handlers": sum(r["client_handlers_s"] for r in rounds),
        "collect-and-aggregate": sum(r["collect_and_aggregate_s"] for r in rounds),
        "evaluate": sum(r["evaluate_s"] for r in rounds),
        "shut-down": end_wall - max(e for _, _, e in calls),
    }
    accuracy = {d: s.accuracy for d, s in evaluator.history[config.rounds].items()}
    return {"total_s": total, "parts_s": parts, "rounds": rounds, "final_accuracy": accuracy,
            "final_state": outcome.final_state}


def serialisation_costs(config: RunConfig, start: State) -> dict[str, float]:
    """Unit costs (seconds, 1 thread, best of 3) of what moving the weights through Flower does, on these weights."""
    from flwr.app import ArrayRecord

    from strategies.flower.records import record_views

    torch.set_num_threads(1)
    role = roles(config)[0]
    reply = {k: v.clone() for k, v in start.items() if k.startswith("encoder.") or k.startswith(f"heads.{role.domain}.")}
    record = ArrayRecord(dict(start))
    reply_record = ArrayRecord(reply)
    pickled = pickle.dumps(record, protocol=5)
    cases: dict[str, Callable[[], object]] = {
        "arrayrecord-build-global": lambda: ArrayRecord(dict(start)),
        "arrayrecord-decode-global": record.to_torch_state_dict,
        "arrayrecord-build-reply": lambda: ArrayRecord(reply),
        "reply-views (server, zero-copy)": lambda: record_views(reply_record),
        "pickle-dumps-global": lambda: pickle.dumps(record, protocol=5),
        "pickle-loads-global": lambda: pickle.loads(pickled),
        "client-model-rebuild (build_skeleton)": lambda: build_skeleton(resolve_model(config.model), head_sizes(start)),
    }
    best = {}
    for name, fn in cases.items():
        times = []
        for _ in range(3):
            tick = time.perf_counter()
            fn()
            times.append(time.perf_counter() - tick)
        best[name] = min(times)
    n = config.num_clients
    # Per round: the server decodes the global in configure_train and in the evaluator and encodes the merge;
    # each client decodes the global, rebuilds its model and encodes its reply; each message is pickled once
    # each way by Ray (N out, N back).
    best["per-round-server"] = 2 * best["arrayrecord-decode-global"] + best["arrayrecord-build-global"] + n * best[
        "reply-views (server, zero-copy)"]
    best["per-round-per-client"] = (best["arrayrecord-decode-global"] + best["arrayrecord-build-reply"]
                                    + best["client-model-rebuild (build_skeleton)"])
    best["per-round-ray-pickling"] = 2 * n * (best["pickle-dumps-global"] + best["pickle-loads-global"])
    best["model_mb"] = sum(v.nbytes for v in start.values()) / 2**20
    return best


def ratios(results: Mapping[str, dict[str, object]]) -> dict[str, float]:
    """Flower's time over each bare regime's; and without the one-off costs (start-up, shut-down, evaluation)."""
    flower_parts: dict[str, float] = results["flower"]["parts_s"]  # type: ignore[assignment]
    one_off = sum(v for k, v in flower_parts.items() if k.startswith(("import", "start-up", "shut-down")))
    found = {}
    for name, result in results.items():
        if name != "flower":
            found[f"flower / {name}"] = results["flower"]["total_s"] / result["total_s"]  # type: ignore[operator]
    if "bare-parallel" in results:
        parallel_parts: dict[str, float] = results["bare-parallel"]["parts_s"]  # type: ignore[assignment]
        found["flower / bare-parallel, rounds only (no start-up, shut-down)"] = (
            (results["flower"]["total_s"] - one_off) / (results["bare-parallel"]["total_s"] - parallel_parts["start-up"]))
        found["flower / bare-parallel, rounds without evaluation"] = (
            (results["flower"]["total_s"] - one_off - flower_parts["evaluate"])
            / (results["bare-parallel"]["total_s"] - parallel_parts["start-up"] - parallel_parts["evaluate"]))
    return found


def critical_train_s(name: str, result: Mapping[str, object]) -> float:
    """Training time on the critical path: per round the slowest client's, summed (parallel regimes)."""
    if name == "flower":
        per_round = [r["train_s_per_client"] for r in result["rounds"]]  # type: ignore[index, union-attr]
    else:
        per_round = result["train_s_per_round_per_client"]  # type: ignore[assignment]
    return sum(max(r) for r in per_round)


def equal_work(config: RunConfig, results: Mapping[str, dict[str, object]]) -> dict[str, float] | None:
    """Flower over bare-parallel with the same work charged to both, so that load swings during one regime cancel.

    Work is the training critical path plus the evaluation, each measured in its regime; what is left of a
    regime's time is its own cost (start-up, transport, data loading, shut-down). Both regimes are charged the
    mean of their two work figures plus their own cost, at the measured local steps and at RunConfig's default
    local steps (the missing steps at the mean measured seconds per step)."""
    if "bare-parallel" not in results:
        return None
    work = {n: critical_train_s(n, results[n]) + results[n]["parts_s"]["evaluate"]  # type: ignore[index]
            for n in ("flower", "bare-parallel")}
    own = {n: results[n]["total_s"] - work[n] for n in work}  # type: ignore[operator]
    shared = sum(work.values()) / 2
    steps = config.rounds * config.local_steps
    per_step = sum(critical_train_s(n, results[n]) for n in work) / 2 / steps
    found = {
        "flower_own_s": own["flower"],
        "bare_parallel_own_s": own["bare-parallel"],
        "shared_work_s": shared,
        "flower / bare-parallel": (shared + own["flower"]) / (shared + own["bare-parallel"]),
        "seconds_per_step (critical path)": per_step,
    }
    if replace(config, local_steps=RunConfig().local_steps) == RunConfig():  # the default with fewer steps
        at_default = shared + config.rounds * (RunConfig().local_steps - config.local_steps) * per_step
        found["shared_work_s at default local steps"] = at_default
        found["flower / bare-parallel at default local steps"] = (at_default + own["flower"]) / (at_default + own["bare-parallel"])
    return found


def max_abs_diff(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def commit() -> str:
    """The checkout's commit, marked '+dirty' when fl/, strategies/ or sims/ differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "fl", "strategies", "sims"], cwd=ROOT, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def rounded(value: object) -> object:
    """Floats to 4 significant digits, for reading."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=["quick", "default"], default="quick",
                        help="quick: sims/bio_legal.py --quick; default: RunConfig()")
    parser.add_argument("--local-steps", type=int, help="override the preset's local steps (to fit the default in time)")
    parser.add_argument("--rounds", type=int, help="override the preset's rounds")
    parser.add_argument("--small", action="store_true", help=f"tiny smoke configuration: quick with {SMALL}")
    parser.add_argument("--sequential-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--eval-threads", type=int, default=1,
                        help="torch threads of the central evaluation in every regime (1: immune to other jobs' load)")
    parser.add_argument("--regimes", default=",".join(REGIMES), help="comma-separated, from: " + ", ".join(REGIMES))
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    chosen = [r.strip() for r in args.regimes.split(",")]
    if "flower" not in chosen or not set(chosen) <= set(REGIMES) or len(chosen) < 2:
        parser.error(f"--regimes {args.regimes}: expected flower and at least one of the bare regimes")

    overrides = dict(QUICK) if args.preset == "quick" else {}
    if args.small:
        overrides.update(SMALL)
    if args.local_steps:
        overrides["local_steps"] = args.local_steps
    if args.rounds:
        overrides["rounds"] = args.rounds
    config = replace(RunConfig(), **overrides).validate()
    started = time.perf_counter()
    load_start = os.getloadavg()

    torch.set_num_threads(args.eval_threads)
    workbench = make_workbench(config, resolve_model(config.model), load_domains(config))
    start, base_scores = fit_base(workbench)
    setup_s = time.perf_counter() - started

    loads: dict[str, object] = {}
    results: dict[str, dict[str, object]] = {}
    regimes: dict[str, Callable[[], dict[str, object]]] = {
        "bare-parallel": lambda: bare_parallel(workbench, start, args.eval_threads),
        "flower": lambda: flower(workbench, start, base_scores, args.eval_threads),
        "bare-sequential": lambda: bare_sequential(workbench, start, args.sequential_threads, args.eval_threads),
    }
    for name in [r for r in REGIMES if r in chosen]:
        run = regimes[name]
        before = os.getloadavg()
        results[name] = run()
        loads[name] = {"before": before, "after": os.getloadavg()}
    serialisation = serialisation_costs(config, start)

    states = {name: r.pop("final_state") for name, r in results.items()}
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": commit(),
        "preset": args.preset + (" (small)" if args.small else ""),
        "client_optimizer_steps_total": config.num_clients * config.rounds * config.local_steps,
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "loadavg_at_start": load_start,
                    "loadavg_at_end": os.getloadavg(), "loadavg_per_regime": loads},
        "setup_s (workbench + fit_base, shared)": setup_s,
        "ratios": ratios(results),
        "equal_work": equal_work(config, results),
        "regimes": results,
        "serialisation_s": serialisation,
        "final_weights_max_abs_diff": {f"flower vs {n}": max_abs_diff(states["flower"], s) for n, s in states.items()
                                       if n != "flower"},
        "total_s": time.perf_counter() - started,
    }
    emit_json({**rounded(report), "config": config.to_record()}, args.out)  # type: ignore[dict-item]


if __name__ == "__main__":
    main()
