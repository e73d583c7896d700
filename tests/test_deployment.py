"""Flower's own runtime on 127.0.0.1: ``flwr run .`` in simulation mode, and a deployment (one SuperLink,
one SuperNode per domain) plain and over TLS with SuperNode authentication, started with the commands of
docs/deployment.md; plus SuperNodes with a bad role and a SuperNode lost mid-run.

``flwr run --stream`` exits 0 even when the ServerApp crashed, so every run is judged by its final status
(``flwr ls --run-id``). Every process a test starts is stopped by its id (its process group, and any
descendant in another group) at the end, even when the test fails, and the test then checks none is left.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fl.apps.server_app import app_options
from fl.federation.client import client_role
from fl.modeling.folder import load_merged
from fl.run.config import APP_OPTIONS, ConfigError, RunConfig
from strategies.options import OptionError
from strategies.rules import default_values
from tests.conftest import FINANCE_WORDS, write_domain_csv

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # flwr, flower-superlink, flower-supernode of this environment
RUN_TIMEOUT = 300  # seconds for one `flwr run`; a healthy tiny run takes 1-2 minutes on 2 busy cores
EXPERIMENT_KEYS = {
    "config", "strategies-run", "strategy-options", "seed", "versions", "domains", "baselines", "strategies", "table", "effects",
    "against-fedavg", "wall-seconds", "attack", "repair", "transfer",
}
FEDERATED_KEYS = {"config", "strategies-run", "strategy-options", "seed", "versions", "domains", "strategies", "wall-seconds"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_tree(roots: set[int]) -> set[int]:
    """Every live descendant of `roots` (Linux /proc), roots included."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found = {p for p in roots if alive(p)}
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to reap it counts as stopped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Flower:
    """Starts Flower's processes for one test, logs each to a file, and stops all of them by id."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.logs = home / "logs"
        self.logs.mkdir(parents=True)
        self.env = {
            **os.environ,
            "FLWR_HOME": str(home),
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "OMP_NUM_THREADS": "1",  # each ClientApp uses one thread (fl.federation.client.use_granted_threads)
            "FLWR_DISABLE_UPDATE_CHECK": "1",
        }
        self.started: list[subprocess.Popen[bytes]] = []
        self.local_superlink_port: int | None = None  # `flwr run` starts it detached: found by its port

    def start(self, name: str, *command: str) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(
                [str(BIN / command[0]), *command[1:]],
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def wait_for(self, name: str, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if found := re.search(pattern, self.log(name)):
                return found
            time.sleep(0.5)
        raise AssertionError(f"'{pattern}' not in {name}'s log after {timeout:.0f} s:\n{self.log(name)[-3000:]}")

    def cli(self, name: str, *args: str, timeout: float = 120) -> str:
        """Run one `flwr` command to its end; its output (stdout and stderr)."""
        self.start(name, "flwr", *args).wait(timeout)
        return self.log(name)

    def connection(self, name: str, address: str, root_certificates: Path | None = None) -> None:
        """$FLWR_HOME/config.toml: where `flwr` finds the SuperLink (no federations in pyproject.toml)."""
        security = f'root-certificates = "{root_certificates}"' if root_certificates else "insecure = true"
        text = f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n{security}\n'
        (self.home / "config.toml").write_text(text)

    def cli_json(self, name: str, *args: str) -> dict[str, object]:
        """A `flwr ... --format json` command's answer."""
        out = self.cli(name, *args, "--format", "json", timeout=60)
        answer, _ = json.JSONDecoder().raw_decode(out[out.index("{") :])
        assert answer["success"], out
        return answer

    def status(self, connection: str, run_id: str) -> dict[str, object]:
        (run,) = self.cli_json(f"ls-{run_id}", "ls", "--run-id", run_id, connection)["runs"]
        return run

    def stop_all(self) -> list[str]:
        """SIGTERM every started process group and descendant (SIGKILL after 20 s); what is still alive."""
        roots = {p.pid for p in self.started}
        if self.local_superlink_port is not None:
            needle = f"--port {self.local_superlink_port} "
            roots |= {int(p.name) for p in Path("/proc").glob("[0-9]*") if "flower-superlink" in cmdline(int(p.name)) and needle in cmdline(int(p.name))}
        tree = process_tree(roots)
        for sig, grace in [(signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)]:
            for pid in process_tree(tree) | tree:
                signal_process(pid, sig)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(alive(p) for p in tree):
                for proc in self.started:
                    proc.poll()  # reap our own children
                time.sleep(0.2)
        for proc in self.started:
            proc.poll()
        return [f"{p}: {cmdline(p)[:120]}" for p in sorted(tree) if alive(p)]


def signal_process(pid: int, sig: signal.Signals) -> None:
    """The process group `pid` leads (every process we start leads one), else the process alone."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


@pytest.fixture
def flower(tmp_path: Path) -> Iterator[Flower]:
    runner = Flower(tmp_path / "flwr-home")
    try:
        yield runner
    finally:
        left = runner.stop_all()
        assert not left, f"Flower processes still running after the test: {left}"


@pytest.fixture
def run_config(tiny_model_dir: Path, toy_csvs: tuple[Path, Path], tmp_path: Path):
    """Writes a --run-config TOML file for 2 rounds of the tiny model on the toy CSVs (absolute paths)."""

    def write(**overrides: object) -> Path:
        import tomli_w

        bio, legal = toy_csvs
        values = {
            "model": str(tiny_model_dir),
            "bio-data": str(bio),
            "legal-data": str(legal),
            "train-size": 60,
            "test-size": 24,
            "max-length": 16,
            "batch-size": 8,
            "rounds": 2,
            "local-steps": 1,
            "strategies": "fedavg",
            "out": str(tmp_path / "out"),
            **overrides,
        }
        path = tmp_path / "run-config.toml"
        path.write_text(tomli_w.dumps(values))
        return path

    return write


# ---------------------------------------------------------------------------------------------- checks


def assert_experiment_results(out: Path, strategy: str = "fedavg", statistic: str | None = None) -> None:
    """The files and results.json layout of sims/bio_legal.py, every domain scored every round; a rule with a
    statistic received it from every client every round (bytes recorded per client)."""
    results = json.loads((out / "results.json").read_text())
    assert set(results) == EXPERIMENT_KEYS
    run = results["strategies"][strategy]
    assert [r["round"] for r in run["rounds"]] == [0, 1, 2]
    assert all(0.0 <= r[d]["accuracy"] <= 1.0 for r in run["rounds"] for d in ["bio", "legal"])
    assert [sorted(c["client"].split("(")[1] for c in h["clients"]) for h in run["clients"]] == [["bio-0)", "legal-0)"]] * 2
    sent = [set(c["bytes-sent"]) for h in run["clients"] for c in h["clients"]]
    assert sent == [{"arrays", statistic} if statistic else {"arrays"}] * 4
    assert f"| {strategy} |" in (out / "results.md").read_text()
    assert (out / "curves.png").stat().st_size > 1000
    _, labels = load_merged(out / strategy)
    assert set(labels) == {"bio", "legal"}


def run_app(flower: Flower, connection: str, config_file: Path, *extra: str) -> tuple[str, str]:
    """`flwr run . <connection> --stream` to its end: the run id and the streamed log."""
    proc = flower.start("run", "flwr", "run", ".", connection, "--stream", "--run-config", str(config_file), *extra)
    proc.wait(RUN_TIMEOUT)
    log = flower.log("run")
    found = re.search(r"Successfully started run (\d+)", log)
    assert found, log[-3000:]
    return found.group(1), log


@dataclass
class Deployment:
    connection: str  # its name in $FLWR_HOME/config.toml
    address: str
    nodes: dict[str, subprocess.Popen[bytes]]
    node_ids: dict[str, str]


def start_deployment(flower: Flower, roles: dict[str, str], tls: Path | None = None) -> Deployment:
    """A SuperLink and one SuperNode per role (name -> --node-config) on free ports, all connected."""
    port = free_port()
    security = ["--insecure"]
    if tls is not None:
        security = ["--ssl-ca-certfile", str(tls / "ca.pem"), "--ssl-certfile", str(tls / "server.pem"), "--ssl-keyfile", str(tls / "server.key")]
        security += ["--enable-supernode-auth"]
    flower.start("superlink", "flower-superlink", *security, "--host", "127.0.0.1", "--port", str(port), "--disable-runtime-dependency-installation")
    flower.wait_for("superlink", "Uvicorn running on", 60)
    flower.connection("trial", f"127.0.0.1:{port}", tls / "ca.pem" if tls else None)
    nodes, registered = {}, {}
    for name, node_config in roles.items():
        node_security = ["--insecure"]
        if tls is not None:
            registered[name] = str(flower.cli_json(f"register-{name}", "supernode", "register", str(tls / f"{name}_key.pub"), "trial")["node-id"])
            node_security = ["--root-certificates", str(tls / "ca.pem"), "--auth-supernode-private-key", str(tls / f"{name}_key")]
        nodes[name] = flower.start(
            name, "flower-supernode", *node_security, "--superlink", f"127.0.0.1:{port}", "--port", str(free_port()), "--node-config", node_config
        )
    node_ids = {name: flower.wait_for(name, r"SuperNode ID: (\d+)", 60).group(1) for name in roles}
    assert tls is None or node_ids == registered  # with authentication a node is the one its key registered
    return Deployment("trial", f"127.0.0.1:{port}", nodes, node_ids)


def make_tls_files(folder: Path, names: list[str]) -> Path:
    """A trial CA, a SuperLink certificate for 127.0.0.1 and an ECDSA P-384 key pair per SuperNode.

    With openssl and ssh-keygen on the PATH these are docs/deployment.md's commands; without them the
    same files are made with the `cryptography` package.
    """
    folder.mkdir()
    if shutil.which("openssl") and shutil.which("ssh-keygen"):
        extensions = (
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
            "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
        )
        (folder / "server.ext").write_text(extensions)
        commands = [
            "openssl req -x509 -newkey rsa:2048 -sha256 -days 30 -nodes -subj /CN=fedmerge-trial-CA -keyout ca.key -out ca.pem",
            "openssl req -newkey rsa:2048 -sha256 -nodes -subj /CN=superlink -keyout server.key -out server.csr",
            "openssl x509 -req -sha256 -days 30 -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -extfile server.ext -out server.pem",
            *[f"ssh-keygen -q -t ecdsa -b 384 -N '' -C {name} -f {name}_key" for name in names],
        ]
        for command in commands:
            subprocess.run(command, shell=True, cwd=folder, check=True, capture_output=True)
    else:
        make_tls_files_in_python(folder, names)
    return folder


def make_tls_files_in_python(folder: Path, names: list[str]) -> None:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def certificate(subject: str, key, issuer: str, issuer_key, extensions) -> x509.Certificate:
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(issuer_key, hashes.SHA256())

    def pem_key(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    ca_key, server_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca = certificate("fedmerge-trial-CA", ca_key, "fedmerge-trial-CA", ca_key, [(x509.BasicConstraints(ca=True, path_length=None), True)])
    server = certificate(
        "superlink",
        server_key,
        "fedmerge-trial-CA",
        ca_key,
        [
            (x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), False),
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        ],
    )
    (folder / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (folder / "server.pem").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    (folder / "server.key").write_bytes(pem_key(server_key))
    for name in names:
        key = ec.generate_private_key(ec.SECP384R1())
        (folder / f"{name}_key").write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
        )
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        (folder / f"{name}_key.pub").write_bytes(public + f" {name}\n".encode())


BIO = 'domain="bio" partition-id=0 num-partitions=1'
LEGAL = 'domain="legal" partition-id=0 num-partitions=1'


# ---------------------------------------------------------------------------------------------- tests


def test_app_config_in_pyproject_lists_every_run_config_option_with_its_default() -> None:
    app = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]

    declared = app["config"]

    assert app["components"] == {"serverapp": "fl.apps.server_app:app", "clientapp": "fl.apps.client_app:app"}
    rule_options = default_values()
    assert {k: v for k, v in declared.items() if k not in APP_OPTIONS and k not in rule_options} == RunConfig().to_record()
    assert {k: v for k, v in declared.items() if k in rule_options} == rule_options
    assert set(APP_OPTIONS) <= set(declared)


@pytest.mark.parametrize(
    ("node_config", "needle"),
    [
        ({"domain": "law"}, "node domain 'law' is unknown: expected one of bio, legal"),
        ({"domain": "bio", "partition-id": 2, "num-partitions": 2}, "partition-id 2 out of range: expected 0..1"),
        ({"partition-id": 5}, "partition-id 5 out of range: expected 0..1"),  # simulation: ids cover both domains
    ],
)
def test_a_supernode_refuses_a_role_outside_the_federation_naming_the_value(node_config: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(needle)}$"):
        client_role(RunConfig(), node_config)


def test_a_supernode_reads_its_domain_and_partition_from_its_node_config() -> None:
    role = client_role(RunConfig(), {"domain": "legal", "partition-id": 1, "num-partitions": 3})

    assert (role.domain, role.partition_id, role.num_partitions) == ("legal", 1, 3)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"strategies": "fedavg,fedsgd"}, "unknown fedsgd"),
        ({"out": "runs/x"}, "'runs/x' is relative"),
        ({"rounds": 0}, "--rounds 0"),
        ({"strategies": "ties", "ties-density": 1.5}, "ties-density 1.5: expected a number > 0 and <= 1"),
        ({"fisher-floor": "nan"}, "fisher-floor nan: expected a number > 0 and <= 1"),
    ],
)
def test_the_server_app_refuses_a_bad_run_config_before_loading_anything(overrides: dict[str, object], needle: str) -> None:
    record = {"strategies": "fedavg", "out": "/tmp/fedmerge-out", **overrides}

    with pytest.raises(OptionError, match=re.escape(needle)):
        app_options(record)


def test_flwr_run_in_simulation_mode_writes_the_experiment_results(flower: Flower, run_config, tmp_path: Path) -> None:
    flower.local_superlink_port = free_port()
    flower.env |= {
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(flower.local_superlink_port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    (flower.home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    federation = "num-supernodes=2 client-resources-num-cpus=1 client-resources-num-gpus=0.0"

    run_id, log = run_app(flower, "local", run_config(strategies="fisher", **{"fisher-batches": 1}), "--federation-config", federation)

    assert flower.status("local", run_id)["status"] == "finished:completed", log[-3000:]
    assert_experiment_results(tmp_path / "out", "fisher", "fisher")


def test_deployment_over_tls_with_supernode_auth_and_no_text_on_the_server(flower: Flower, run_config, tmp_path: Path) -> None:
    """One SuperNode per domain, TLS, node authentication, a rule whose clients send statistics (regmean), and a
    server that holds no text."""
    tls = make_tls_files(tmp_path / "tls", ["bio", "legal", "unregistered"])
    deployment = start_deployment(flower, {"bio": BIO, "legal": LEGAL}, tls)
    intruder = flower.start(
        "unregistered",
        *["flower-supernode", "--root-certificates", str(tls / "ca.pem"), "--auth-supernode-private-key", str(tls / "unregistered_key")],
        *["--superlink", deployment.address, "--port", str(free_port()), "--max-retries", "1", "--node-config", BIO],
    )

    config = run_config(strategies="regmean", **{"server-data": False, "regmean-alpha": 0.5, "regmean-batches": 1})
    run_id, log = run_app(flower, deployment.connection, config)

    assert flower.status(deployment.connection, run_id)["status"] == "finished:completed", log[-3000:]
    assert intruder.wait(60) != 0 and "Failed to activate SuperNode" in flower.log("unregistered")
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results) == FEDERATED_KEYS  # no baselines: the server saw no text
    assert results["strategy-options"] == {"regmean": {"regmean-batches": 1, "regmean-alpha": 0.5}}
    sent = [set(c["bytes-sent"]) for h in results["strategies"]["regmean"]["clients"] for c in h["clients"]]
    assert sent == [{"arrays", "gram"}] * 4
    rounds = results["strategies"]["regmean"]["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r[d]["clients"] == 1 and r[d]["test-examples"] == 24 and 0 <= r[d]["accuracy"] <= 1 for r in rounds for d in ["bio", "legal"])
    assert results["domains"]["bio"]["nodes"] == [f"node {deployment.node_ids['bio']} (bio-0)"]
    assert results["domains"]["legal"]["labels"] == ["class-0", "class-1", "class-2"]
    _, labels = load_merged(tmp_path / "out" / "regmean")
    assert labels == {"bio": ["class-0", "class-1", "class-2"], "legal": ["class-0", "class-1", "class-2"]}


def start_run_and_kill_legal_in_round_1(
    flower: Flower, deployment: Deployment, config_file: Path, sig: signal.Signals = signal.SIGKILL
) -> tuple[str, subprocess.Popen[bytes]]:
    """SIGKILL: no goodbye, the SuperLink misses the node's heartbeats (<= 60 s). SIGTERM: the node signs off.
    The node is killed once it received round 1's training (after the roll call), before it can reply."""
    proc = flower.start("run", "flwr", "run", ".", deployment.connection, "--stream", "--run-config", str(config_file))
    run_id = flower.wait_for("run", r"Successfully started run (\d+)", 120).group(1)
    flower.wait_for("legal", r"Receiving: train message", RUN_TIMEOUT)
    os.killpg(deployment.nodes["legal"].pid, sig)
    proc.wait(RUN_TIMEOUT)
    return run_id, proc


def test_supernodes_with_a_bad_role_fail_the_run_at_the_roll_call_naming_each(flower: Flower, run_config) -> None:
    roles = {"law": 'domain="law" partition-id=0 num-partitions=1', "bio": 'domain="bio" partition-id=1 num-partitions=1', "legal": LEGAL}
    deployment = start_deployment(flower, roles)
    law, bio = (deployment.node_ids[name] for name in ("law", "bio"))

    run_id, _ = run_app(flower, deployment.connection, run_config())

    run = flower.status(deployment.connection, run_id)
    assert run["status"] == "finished:failed", flower.log("run")[-3000:]
    details = str(run["status-details"])
    assert "\n" not in details
    assert "round 1 roll call: 2 of 3 clients failed" in details  # before any training: which client each node serves
    assert f"node {law}: node domain 'law' is unknown: expected one of bio, legal" in details
    assert f"node {bio}: partition-id 1 out of range: expected 0..0" in details
    assert flower.log("law").count("node domain 'law' is unknown") >= 1
    assert flower.log("bio").count("partition-id 1 out of range: expected 0..0") >= 1


def test_with_on_node_loss_continue_a_lost_supernode_is_dropped_and_the_run_completes(flower: Flower, run_config, tmp_path: Path) -> None:
    deployment = start_deployment(flower, {"bio": BIO, "legal": LEGAL})

    run_id, _ = start_run_and_kill_legal_in_round_1(flower, deployment, run_config(**{"on-node-loss": "continue"}), signal.SIGTERM)

    run = flower.status(deployment.connection, run_id)
    assert run["status"] == "finished:completed", flower.log("run")[-3000:]
    history = json.loads((tmp_path / "out" / "results.json").read_text())["strategies"]["fedavg"]["clients"]
    lost = [(h["round"], entry) for h in history for entry in h["lost"]]
    assert [(r, e["node"], e["stage"]) for r, e in lost] == [(1, f"node {deployment.node_ids['legal']} (legal-0)", "train")]  # named by the roll call
    assert "Node Unavailable" in lost[0][1]["reason"]
    assert [[c["client"] for c in h["clients"]] for h in history] == [[f"node {deployment.node_ids['bio']} (bio-0)"]] * 2


def test_a_deployment_whose_server_app_is_killed_after_round_1_resumes_to_completion(flower: Flower, run_config, tmp_path: Path) -> None:
    deployment = start_deployment(flower, {"bio": BIO, "legal": LEGAL})
    config = run_config(rounds=3)
    flower.start("run", "flwr", "run", ".", deployment.connection, "--stream", "--run-config", str(config))
    first = flower.wait_for("run", r"Successfully started run (\d+)", 120).group(1)
    state = tmp_path / "out" / "checkpoints" / "fedavg" / "state.json"
    deadline = time.monotonic() + RUN_TIMEOUT
    while not state.exists():
        assert time.monotonic() < deadline, flower.log("run")[-3000:]
        time.sleep(0.2)
    server_apps = [int(p.name) for p in Path("/proc").glob("[0-9]*") if "flwr-serverapp" in cmdline(int(p.name))]
    assert server_apps, "no flwr-serverapp process found"
    for pid in server_apps:
        os.kill(pid, signal.SIGKILL)
    killed_after = json.loads(state.read_text())["round"]
    assert killed_after < 3

    run_id, log = run_app(flower, deployment.connection, run_config(rounds=3, resume=True))

    assert run_id != first
    assert flower.status(deployment.connection, run_id)["status"] == "finished:completed", log[-3000:]
    assert f"resuming after round {killed_after} of 3" in log and "baselines read back" in log
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    run = results["strategies"]["fedavg"]
    assert [r["round"] for r in run["rounds"]] == [0, 1, 2, 3]
    assert [h["round"] for h in run["clients"]] == [1, 2, 3]
    _, labels = load_merged(tmp_path / "out" / "fedavg")
    assert set(labels) == {"bio", "legal"}


def test_three_supernodes_serve_the_three_domains_a_run_config_names_with_lora_clients(flower: Flower, run_config, toy_csvs, tmp_path: Path) -> None:
    """Three domains of a run config, each on its own SuperNode, whose clients train and send LoRA adapters."""
    finance = write_domain_csv(tmp_path / "finance.csv", FINANCE_WORDS, 120, 2)
    bio, legal = toy_csvs
    domains = {"domain-data": f"bio={bio}; legal={legal}; finance={finance}", "bio-data": "hpo", "legal-data": "licenses"}
    deployment = start_deployment(flower, {"bio": BIO, "legal": LEGAL, "finance": 'domain="finance" partition-id=0 num-partitions=1'})

    run_id, _ = run_app(flower, deployment.connection, run_config(**domains, peft="lora", **{"lora-rank": 4}))

    assert flower.status(deployment.connection, run_id)["status"] == "finished:completed", flower.log("run")[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    run = results["strategies"]["fedavg"]
    assert all(set(r) == {"round", "bio", "legal", "finance"} for r in run["rounds"])
    assert [sorted(c["client"].split("(")[1].rstrip(")") for c in h["clients"]) for h in run["clients"]] == [["bio-0", "finance-0", "legal-0"]] * 2
    assert list(results["transfer"]) == ["bio-expert", "legal-expert", "finance-expert"]
    _, labels = load_merged(tmp_path / "out" / "fedavg")
    assert set(labels) == {"bio", "legal", "finance"}
    # adapters and a head only: 2 layers x 2 modules x 2 factors of 4 x 32, and a 3 x 32 head (the tiny model is 4 MB)
    assert all(c["bytes-sent"]["arrays"] < 20_000 for h in run["clients"] for c in h["clients"])
    assert (tmp_path / "out" / "fedavg" / "adapter" / "adapter_config.json").is_file()
