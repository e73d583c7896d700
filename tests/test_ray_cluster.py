"""A simulation attached to a running two-node Ray cluster (fl.federation.simulation.SimulationResources; docs/scale-out.md).

The cluster is started on loopback with the commands docs/scale-out.md gives, each node with 1 CPU, so 2 clients
of 1 CPU must run one on each node. Other tests and engineers may run Ray on this machine at the same time:
`ray stop` kills every Ray process of the machine (it matches process names), so the nodes started here are
stopped by their own process groups, and each node keeps its files in its own --temp-dir.
"""

import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

import fl.federation.client
import fl.federation.simulation
from fl.federation.rounds import CentralEvaluator, StrategyJob
from fl.federation.simulation import SimulationResources, check_resources, run_strategy
from fl.run.config import ConfigError, RunConfig
from fl.run.domains import load_domains
from fl.studies.baselines import FEDAVG, fit_base, make_workbench
from tests.conftest import tiny_run_config

START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_ports() -> list[str]:
    """Ports every node on one machine needs of its own (the defaults are fixed numbers that two nodes would share)."""
    names = ["node-manager", "object-manager", "dashboard-agent-listen", "dashboard-agent-grpc", "runtime-env-agent", "metrics-export"]
    return [f"--{name}-port={free_port()}" for name in names]


def start_node(args: list[str], log: Path) -> int:
    """`ray start ...` in a new session: it returns once the node is up, and the node's daemons and workers stay in
    its process group (its id is returned)."""
    with log.open("w") as out:
        process = subprocess.Popen(["ray", "start", *args], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        code = process.wait(timeout=START_TIMEOUT_S)
    if code != 0:
        os.killpg(process.pid, signal.SIGKILL)
        raise RuntimeError(f"ray start failed ({code}):\n{log.read_text()[-3000:]}")
    return process.pid


def processes_of(groups: list[int], folder: str) -> list[psutil.Process]:
    """Live (not zombie) processes in `groups` or naming `folder` on their command line."""
    found = []
    for process in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            mine = os.getpgid(process.pid) in groups or folder in " ".join(process.info["cmdline"] or [])
        except (ProcessLookupError, psutil.Error):
            continue
        if mine and process.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(process)
    return found


@contextmanager
def two_node_cluster() -> Iterator[tuple[str, str, list[int]]]:
    """A head and a second node, 1 CPU each, on loopback; yields (address, temp folder, process groups)."""
    folder = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's Unix sockets live under it (108-byte limit)
    groups: list[int] = []
    port = free_port()
    light = ["--num-cpus=1", "--disable-usage-stats", "--object-store-memory=80000000"]
    try:
        groups.append(start_node([
            "--head", f"--port={port}", "--include-dashboard=false", f"--dashboard-port={free_port()}",
            f"--ray-client-server-port={free_port()}", f"--temp-dir={folder}/head", *light, *node_ports(),
        ], Path(folder) / "head.log"))
        groups.append(start_node([
            f"--address=127.0.0.1:{port}", f"--temp-dir={folder}/node2", *light, *node_ports(),
        ], Path(folder) / "node2.log"))
        yield f"127.0.0.1:{port}", folder, groups
    finally:
        for group in groups:  # what `ray stop --force` does, for these two nodes only
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 30
        while processes_of(groups, folder) and time.monotonic() < deadline:
            time.sleep(0.5)
        shutil.rmtree(folder, ignore_errors=True)


def recording_client_app(log: str) -> Callable[[RunConfig], ClientApp]:
    """The project's ClientApp, recording which Ray node served each train message."""

    def make(config: RunConfig) -> ClientApp:
        inner = fl.federation.client.make_client_app(config)
        app = ClientApp()

        @app.train()
        def train(msg: Message, context: Context) -> Message:
            import ray

            with open(log, "a") as f:
                f.write(f"{ray.get_runtime_context().get_node_id()} {context.node_config['partition-id']}\n")
            return inner(msg, context)

        app.evaluate()(inner)
        app.query()(inner)
        return app

    return make


def test_two_clients_run_one_on_each_node_of_a_ray_cluster_that_outlives_each_strategy(
    tiny_model_dir: Path, toy_csvs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import ray

    config = tiny_run_config(tiny_model_dir, toy_csvs, rounds=2)
    workbench = make_workbench(config, str(tiny_model_dir), load_domains(config))
    start, base_scores = fit_base(workbench)
    served = tmp_path / "served.txt"
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(fl.federation.simulation, "make_client_app", recording_client_app(str(served)))
    caplog.set_level(logging.INFO, logger="fl.federation.simulation")

    with two_node_cluster() as (address, folder, groups):
        resources = SimulationResources(ray_address=address, cpus_per_client=1)
        check_resources(resources, config.num_clients)
        with pytest.raises(ConfigError, match="has no GPU"):
            check_resources(SimulationResources(ray_address=address, gpus_per_client=0.5), config.num_clients)
        evaluator = CentralEvaluator(workbench.model, workbench.test_sets, "fedavg", initial_scores=base_scores)

        outcome = run_strategy(StrategyJob(config, FEDAVG, start, evaluator), resources=resources)
        disconnected = not ray.is_initialized()  # Flower's ray.shutdown only disconnected this driver...
        evaluator_again = CentralEvaluator(workbench.model, workbench.test_sets, "again", initial_scores=base_scores)
        again = run_strategy(StrategyJob(replace(config, rounds=1), FEDAVG, start, evaluator_again), resources=resources)  # ...the next one attaches

        ray.init(address=address)
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        ray.shutdown()
        running = processes_of(groups, folder)

    assert disconnected
    assert [len(h["clients"]) for h in outcome.client_history] == [2, 2] and set(outcome.final_state) == set(start)
    assert [len(h["clients"]) for h in again.client_history] == [2]
    assert f"attached to the Ray cluster at {address}: 2 CPUs, 0 GPUs, 2 nodes" in caplog.messages
    records = [line.split() for line in served.read_text().splitlines()]
    assert len(records) == 6
    assert len(nodes) == 2 and {node for node, _ in records[:4]} == nodes and {node for node, _ in records[4:]} == nodes
    assert running and not processes_of(groups, folder)  # the nodes ran until stopped, and nothing of theirs is left
