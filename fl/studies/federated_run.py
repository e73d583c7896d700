"""A federated-only run (``server-data = false``): the server holds no text, only the base model.

For a deployment in which each domain's text stays on its own SuperNode. Without data the server
cannot fit probes, train baselines or score the global model, so: it asks every node which domain it
serves and that domain's label names (names only, no text), starts the heads seeded-random, runs each
strategy with client evaluation on, and reports each round's per-domain mean of the clients' own
test scores. It writes results.json, results.md and one merged-model folder per strategy.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fl.federation.rounds import StrategyJob, read_back, run_and_save, run_on_grid
from fl.modeling.folder import save_merged
from fl.modeling.lora import with_adapters
from fl.modeling.model import build_model, check_model, cpu_state, load_tokenizer
from fl.run import files, seeds
from fl.run.checkpoint import RunFolder
from fl.run.config import ConfigError, RunConfig
from fl.run.files import write_results
from fl.run.phases import PhaseClock
from strategies.flower.replies import ReplyPolicy, RoundFailed, describe_client
from strategies.rules import RuleSetting

log = logging.getLogger(__name__)

CLIENT_METRICS = {"eval-accuracy": "accuracy", "eval-loss": "loss", "num-examples": "test-examples", "clients": "clients"}


def ask_labels(grid: Grid, config: RunConfig) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Each domain's label names and the nodes serving it, from a query to every node; they must agree."""
    policy = ReplyPolicy(config.num_clients, config.reply_timeout)
    nodes = policy.wait(grid, "label query")
    queries = [
        Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type=MessageType.QUERY) for node in nodes
    ]
    policy.sending(queries)
    replies = policy.usable(0, "label query", list(grid.send_and_receive(queries, timeout=config.reply_timeout)))
    labels: dict[str, list[str]] = {}
    members: dict[str, list[str]] = {}
    for msg in replies:
        info = msg.content["client"]
        domain, names = str(info["domain"]), list(info["labels"])  # type: ignore[arg-type]
        if labels.setdefault(domain, names) != names:
            raise ConfigError(f"{describe_client(msg)} has labels {names} for '{domain}', another node has {labels[domain]}")
        members.setdefault(domain, []).append(describe_client(msg))
    missing = [d for d in config.domains if d not in labels]
    if missing:
        raise ConfigError(f"no SuperNode serves domain(s) {', '.join(missing)}: nodes serve {', '.join(sorted(labels))}")
    return {d: labels[d] for d in config.domains}, members


def per_domain_rounds(name: str, evaluations: Mapping[int, Mapping[str, float]], config: RunConfig) -> list[dict[str, object]]:
    """results.json's rounds (as in the full experiment: {"round": r, domain: {"accuracy": ...}}), every domain every round."""
    rounds = []
    for server_round in range(1, config.rounds + 1):
        metrics = evaluations.get(server_round, {})
        row: dict[str, object] = {"round": server_round}
        for domain in config.domains:
            if f"{domain}-eval-accuracy" not in metrics:
                raise RoundFailed(f"strategy {name} round {server_round}: no client evaluation from domain '{domain}'")
            row[domain] = {out: metrics[f"{domain}-{key}"] for key, out in CLIENT_METRICS.items()}
        rounds.append(row)
    return rounds


def markdown_table(config: RunConfig, results: Mapping[str, list[dict[str, object]]]) -> str:
    cols = [f"{d} accuracy" for d in config.domains]
    lines = [
        f"# Federated-only run: {config.rounds} rounds x {config.local_steps} local steps, seed {config.seed}",
        "",
        "The server holds no text: scores are each domain's clients' own test splits, averaged by test examples.",
        "",
        "| strategy | round | " + " | ".join(cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for name, rounds in results.items():
        for row in rounds:
            cells = [f"{100 * row[d]['accuracy']:.1f}" for d in config.domains]  # type: ignore[index]
            lines.append(f"| {name} | {row['round']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_federated(
    grid: Grid, config: RunConfig, strategies: list[RuleSetting], folder: RunFolder, versions: Mapping[str, str]
) -> dict[str, object]:
    """Every strategy from the same seeded start; results and merged models written to the run folder, each
    round checkpointed there (a strategy found checkpointed continues, one found finished is read back)."""
    config = replace(config, client_eval=True)
    torch.manual_seed(config.seed)
    out = folder.out
    clock = PhaseClock()
    with clock.phase("ask the nodes for their domains and labels"):
        labels, members = ask_labels(grid, config)
    with clock.phase("load the base model, heads seeded-random"):
        model_path = check_model(config.model, config.max_length)
        model = build_model(model_path, {d: len(v) for d, v in labels.items()}, config.seed)
        model = with_adapters(model, config.lora_settings(), seeds.adapter_start(config.seed))
        tokenizer = load_tokenizer(model_path)
        start = cpu_state(model)

    def save(state: Mapping[str, torch.Tensor], folder: Path) -> None:
        model.load_state_dict(state)
        save_merged(model, tokenizer, folder, labels)

    curves: dict[str, list[dict[str, object]]] = {}
    strategies_json: dict[str, object] = {}
    for setting in strategies:
        name = setting.name
        job = StrategyJob(config, setting, start, None, folder.strategy(name))
        outcome = read_back(job)
        if outcome is None:
            with clock.phase(f"strategy {name}: {config.num_clients} SuperNodes x {config.rounds} rounds"):
                outcome = run_and_save(job, functools.partial(run_on_grid, grid), lambda state, name=name: save(state, out / name))
        evaluations, history = outcome.client_evaluations, outcome.client_history
        curves[name] = per_domain_rounds(name, evaluations, config)
        strategies_json[name] = {"rounds": curves[name], "clients": history, "model-dir": str(out / name)}
    files.write_text(out / "results.md", markdown_table(config, curves))
    results = {
        "config": config.to_record(),
        "strategies-run": [s.name for s in strategies],
        "strategy-options": {s.name: s.record() for s in strategies},
        "seed": config.seed,
        "versions": dict(versions),
        "domains": {d: {"labels": labels[d], "nodes": members[d]} for d in config.domains},
        "strategies": strategies_json,
        "wall-seconds": clock.seconds,
    }
    write_results(out / "results.json", results)
    return results
