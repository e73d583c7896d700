"""Benchmark: how many clients one Flower simulation of fedmerge takes on this machine, with the default base.

Each case (a client count N, or N:K for K clients sampled per round) runs FedAvg through
``fl.federation.simulation.run_strategy`` in a child process (its own Ray, its own memory) with a tiny budget: 1 local step per
client, small train/test sets, short sequences. FedAvg merges each reply as it arrives, so the driver's memory should
not grow with N. The child also times one local training step alone (same model, data and thread count), so the
steady round's time per client message minus that step is the framework's own cost per message.
The parent samples the memory of the child and all its descendants (Ray's daemons and actors) every
SAMPLE_S seconds from /proc: the sum of PSS (shared pages split between the processes that map them, so
the sum is the tree's real footprint) and the sum of RSS (counts shared pages once per process). Each case
has a timeout after which the whole tree is killed; a case whose pre-flight estimate
(``fl.federation.capacity.check_fits``) does not fit is refused by the child with one line before any work, and the
parent records that line. Time per round comes from the central evaluator's timestamps (round 1 includes
the actors' start-up; later rounds are the steady state).

    python bench/scale.py [--clients 2,100,1000:100] [--rounds 2] [--peft none,lora] [--small] [--out FILE]

With ``--peft lora`` the clients train and send LoRA adapters (fl.modeling.lora); each case then also reports the
bytes of one reply and of one message down.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from emit import emit_json

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_S = 0.25
GIB = 2**30
REFUSED_DEMO = 4096  # a client count far past what fits: shows the refusal message end to end


def children_of() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def descendants(pid: int) -> list[int]:
    tree, found, todo = children_of(), [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(tree.get(p, []))
    return found


def memory_of(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of one process in bytes; (0, 0) once it is gone."""
    pss = rss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
            elif line.startswith("Rss:"):
                rss = int(line.split()[1]) * 1024
    except OSError:
        pass
    return pss, rss


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise KeyError("MemAvailable")


def kill_tree(pid: int) -> None:
    for p in reversed(descendants(pid)):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_case(clients: int, rounds: int, timeout: float, per_round: str = "all", rule: str = "fedavg", peft: str = "none") -> dict[str, object]:
    """Run one client count in a child process, sampling the tree's memory until it ends or times out."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(clients), "--rounds", str(rounds),
               "--per-round", per_round, "--rule", rule, "--peft", peft]
    available_before = mem_available()
    tick = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    peak_pss = peak_rss = peak_driver = processes = 0
    lowest_available = available_before
    timed_out = False
    while child.poll() is None:
        if time.perf_counter() - tick > timeout:
            kill_tree(child.pid)
            timed_out = True
            break
        pids = descendants(child.pid)
        each = [memory_of(p) for p in pids]
        pss, rss = sum(m[0] for m in each), sum(m[1] for m in each)
        peak_pss, peak_rss, processes = max(peak_pss, pss), max(peak_rss, rss), max(processes, len(pids))
        peak_driver = max(peak_driver, each[0][0])  # the simulation's driver: ServerApp, SuperLink state, replies
        lowest_available = min(lowest_available, mem_available())
        time.sleep(SAMPLE_S)
    stdout, stderr = child.communicate()
    case: dict[str, object] = {
        "clients": clients,
        "clients_per_round": per_round,
        "rule": rule,
        "peft": peft,
        "rounds": rounds,
        "wall_s": round(time.perf_counter() - tick, 1),
        "exit_code": child.returncode,
        "peak_pss_gib": round(peak_pss / GIB, 2),
        "peak_rss_sum_gib": round(peak_rss / GIB, 2),
        "peak_driver_pss_gib": round(peak_driver / GIB, 2),
        "max_processes": processes,
        "machine_available_drop_gib": round((available_before - lowest_available) / GIB, 2),
    }
    if timed_out:
        case["error"] = f"timed out after {timeout:.0f} s: process tree killed"
    elif child.returncode != 0:
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        case["error"] = lines[-1] if lines else f"exit code {child.returncode}"
    else:
        case.update(json.loads(stdout.strip().splitlines()[-1]))
    return case


def driver_holdings() -> dict[str, float]:
    """What the driver holds now: its RSS, and the flwr Arrays still referenced (count, GiB of their bytes).
    Arrays that stay referenced round after round are retained replies; RSS that grows without them is the
    allocator keeping freed memory."""
    import gc

    from flwr.app import Array

    arrays = [o for o in gc.get_objects() if isinstance(o, Array)]
    rss = memory_of(os.getpid())[1]
    return {"rss_gib": round(rss / GIB, 2), "live_arrays": len(arrays),
            "live_array_gib": round(sum(len(a.data) for a in arrays) / GIB, 2)}


def one_step_s(workbench, config) -> float:  # noqa: ANN001
    """Seconds of one local training step of one client alone (the work a client message exists for)."""
    from fl.federation.client import ClientRole, training_set
    from fl.modeling.training import train

    data = training_set(config, ClientRole("bio", 0, config.clients_per_domain))
    state = {k: v.detach().clone() for k, v in workbench.model.state_dict().items()}
    times = []
    for repeat in range(3):
        tick = time.perf_counter()
        train(workbench.model, [("bio", data)], config.train_settings(), seed=repeat)
        times.append(time.perf_counter() - tick)
    workbench.model.load_state_dict(state)
    return min(times)


def child(clients: int, rounds: int, per_round: str, rule: str, peft: str) -> int:
    """One simulation; prints one JSON line (per-round times) or, if it cannot fit, one error line and exits 2."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    from fl.federation.capacity import CapacityError, check_fits
    from fl.modeling.model import resolve_model
    from fl.run.config import RunConfig

    per_domain = max(1, clients // 2)
    config = replace(
        RunConfig(),
        clients_per_domain=per_domain,
        train_size=max(64, 4 * per_domain),  # at least 4 examples per client
        test_size=32,
        max_length=16,
        rounds=rounds,
        local_steps=1,
        clients_per_round=per_round,
        peft=peft,
    ).validate()
    from strategies.rules import RULES, settings

    try:
        estimate = check_fits(config, streamed=RULES[rule].streams)  # as sims/bio_legal.py does before starting Ray
    except CapacityError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    import torch

    from fl.federation.rounds import CentralEvaluator, StrategyJob
    from fl.federation.simulation import run_strategy
    from fl.run.domains import load_domains
    from fl.studies.baselines import make_workbench

    torch.set_num_threads(1)
    workbench = make_workbench(config, resolve_model(config.model), load_domains(config))
    start = {k: v.detach().clone() for k, v in workbench.model.state_dict().items()}
    step_s = one_step_s(workbench, config)
    calls: list[tuple[int, float, float]] = []
    held: list[dict[str, float]] = []

    class TimedEvaluator(CentralEvaluator):
        def __call__(self, server_round, arrays):  # noqa: ANN001, ANN204
            begin = time.perf_counter()
            result = super().__call__(server_round, arrays)
            calls.append((server_round, begin, time.perf_counter()))
            held.append(driver_holdings())
            return result

    tick = time.perf_counter()
    outcome = run_strategy(StrategyJob(config, settings([rule], {})[0], start, TimedEvaluator(workbench.model, workbench.test_sets, "scale")))
    total = time.perf_counter() - tick
    ends = {r: e for r, _, e in calls}
    round_s = [round(begin - ends[r - 1], 2) for r, begin, _ in calls if r > 0]
    from strategies.lora import sent_down

    replies = [c["bytes-sent"]["arrays"] for c in outcome.client_history[-1]["clients"]]
    print(json.dumps({
        "simulation_s": round(total, 1),
        "reply_bytes": round(sum(replies) / len(replies)),  # one client's weights, the last round's mean
        "down_bytes": sum(start[k].numel() * start[k].element_size() for k in sent_down(start, embeddings=config.sends_word_embeddings)),  # the global weights a client receives
        "round_s": round_s,  # previous evaluation's end to this round's evaluation (training + transport + merge)
        "replies_per_round": [len(h["clients"]) for h in outcome.client_history],
        "one_step_s": round(step_s, 3),
        # the last round is the steady state: its time x the actors, per message, minus the step itself
        "framework_s_per_message": round(round_s[-1] * estimate.num_actors / len(outcome.client_history[-1]["clients"]) - step_s, 3),
        "driver_after_each_evaluation": held,
        "estimate_gib": round(estimate.peak_bytes / GIB, 2),
        "estimate_max_clients": estimate.max_clients,
    }))
    return 0


def case_of(text: str) -> tuple[int, str]:
    """'N' (every client every round) or 'N:K' (K sampled per round)."""
    clients, _, per_round = text.partition(":")
    return int(clients), per_round or "all"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="2,100,1000:100", help="comma-separated client counts N (even: two domains), or N:K to train K per round")
    parser.add_argument("--rounds", type=int, default=2, help="from round 2 on the driver holds two rounds of replies")
    parser.add_argument("--timeout", type=float, help="seconds per case (default: 120 + 1 s per client message)")
    parser.add_argument("--budget", type=float, default=570, help="seconds for all cases: each timeout is cut to fit")
    parser.add_argument("--small", action="store_true", help="2 clients, 1 round (smoke test)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--refusal", action="store_true", help=f"also show the pre-flight refusal ({REFUSED_DEMO} clients, median: every reply held)")
    parser.add_argument("--peft", default="none", help="comma-separated: none (full fine-tuning), lora; every client count runs with each")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--per-round", default="all", help=argparse.SUPPRESS)
    parser.add_argument("--rule", default="fedavg", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        sys.exit(child(args.child, args.rounds, args.per_round, args.rule, args.peft))

    counts = [(2, "all")] if args.small else [case_of(c) for c in args.clients.split(",")]
    pefts = [p.strip() for p in args.peft.split(",") if p.strip()]
    rounds = 1 if args.small else args.rounds
    started = time.perf_counter()
    report: dict[str, object] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "mem_total_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GIB, 1),
                    "mem_available_gib_at_start": round(mem_available() / GIB, 1), "loadavg_at_start": os.getloadavg()},
        "memory_method": f"sum of PSS (and of RSS) over the child and all its descendants, sampled every {SAMPLE_S} s",
    }
    cases = []
    for (n, per_round), peft in [(count, peft) for count in counts for peft in pefts]:
        left = args.budget - (time.perf_counter() - started) - (20 if args.refusal else 0)  # 20 s kept for the refusal
        messages = (n if per_round == "all" else int(per_round)) * rounds + n  # + the roll call
        timeout = min(args.timeout or 120 + messages, left)
        if timeout < 30:
            cases.append({"clients": n, "rounds": rounds, "skipped": f"no time left in the {args.budget:.0f} s budget"})
            continue
        cases.append({**run_case(n, rounds, timeout, per_round, peft=peft), "timeout_s": timeout, "loadavg_after": os.getloadavg()})
    if args.refusal:
        cases.append({**run_case(REFUSED_DEMO, rounds, 60, rule="median"), "timeout_s": 60, "loadavg_after": os.getloadavg()})
    report["cases"] = cases
    report["loadavg_at_end"] = os.getloadavg()
    report["total_s"] = round(time.perf_counter() - started, 1)
    emit_json(report, args.out)


if __name__ == "__main__":
    main()
