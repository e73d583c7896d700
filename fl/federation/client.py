"""The Flower ClientApp: one data holder fine-tuning the global encoder on its own domain.

A client serves one domain and one partition of it: in simulation both follow from ``partition-id``
(clients_per_domain consecutive ids per domain); in a deployment the SuperNode's ``--node-config``
may name them (``domain="bio" partition-id=0 num-partitions=1``). It trains the encoder and its own
head, and sends back exactly those weights, plus the statistic the server's merge rule asks for in the train
config (``statistic``: a diagonal Fisher or the Gram matrices of layer inputs, ``fl.modeling.client_statistics``). Asked by a
``query`` message, it tells its domain and its label names, so a server that holds no text can still build
the heads. With ``attack`` in the run config, the clients it names poison their training replies (``fl.modeling.attacks``:
a measurement tool, the server is not told who they are).

In simulation a Ray actor serves many clients in turn, so what does not depend on the client is kept per process:
each domain's split, tokenised once, with its partition, and one model that each message's weights are loaded into.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl.data.batches import Encoded, encode
from fl.data.partitions import partition
from fl.data.splits import DomainData
from fl.federation.permuted_init import client_start
from fl.modeling.attacks import flipped_labels, poison
from fl.modeling.client_statistics import STATISTICS, client_statistic
from fl.modeling.evaluation import evaluate
from fl.modeling.lora import with_adapters
from fl.modeling.model import MultiHeadEncoder, build_model, build_skeleton, client_state, load_tokenizer, resolve_model
from fl.modeling.received import load_received
from fl.modeling.train_settings import LoraSettings
from fl.modeling.training import train
from fl.run import seeds
from fl.run.config import ConfigError, RunConfig, split_run_config
from fl.run.domains import load_run_domain

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientRole:
    domain: str
    partition_id: int
    num_partitions: int


def client_role(config: RunConfig, node_config: Mapping[str, object]) -> ClientRole:
    """Read which domain and partition this node serves, refusing values outside the federation."""
    if "domain" in node_config:
        domain = str(node_config["domain"])
        if domain not in config.domains:
            raise ConfigError(f"node domain '{domain}' is unknown: expected one of {', '.join(config.domains)}")
        part = int(node_config.get("partition-id", 0))  # type: ignore[arg-type]
        count = int(node_config.get("num-partitions", 1))  # type: ignore[arg-type]
        if not 0 <= part < count:
            raise ConfigError(f"partition-id {part} out of range: expected 0..{count - 1}")
        return ClientRole(domain, part, count)
    domain, part = config.client_domain(int(node_config.get("partition-id", 0)))  # type: ignore[arg-type]
    return ClientRole(domain, part, config.clients_per_domain)


@lru_cache(maxsize=8)
def domain_source(config: RunConfig, domain: str) -> DomainData:
    """A domain's split, loaded once per process: every client of the domain that this actor serves shares it."""
    return load_run_domain(config, domain)


@lru_cache(maxsize=8)
def encoded_domain(config: RunConfig, domain: str, num_partitions: int) -> tuple[Encoded, Encoded, list[np.ndarray]]:
    """A domain's tokenised training and test sets and its partition, once per process (not once per client):
    a client's message then costs only the slicing of its partition."""
    data = domain_source(config, domain)
    tokenizer = load_tokenizer(resolve_model(config.model))
    parts = partition(data.train.labels, num_partitions, config.partition, config.seed)
    return (
        encode(tokenizer, data.train.texts, data.train.labels, config.max_length),
        encode(tokenizer, data.test.texts, data.test.labels, config.max_length),
        parts,
    )


def client_data(config: RunConfig, role: ClientRole) -> tuple[Encoded, Encoded, int]:
    """This client's tokenised training partition, its domain's test set, and the domain's label count."""
    train_all, test, parts = encoded_domain(config, role.domain, role.num_partitions)
    return train_all.subset(parts[role.partition_id]), test, domain_source(config, role.domain).num_labels


def training_set(config: RunConfig, role: ClientRole) -> Encoded:
    """The examples this client trains on: its partition, with deranged labels if --attack made it a label flipper."""
    train_data, _, num_labels = client_data(config, role)
    attack = config.attack_of(role.domain, role.partition_id)
    if attack is not None and attack.kind == "label-flip":
        return replace(train_data, labels=flipped_labels(train_data.labels, num_labels, config.seed))
    return train_data


def head_sizes(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    return {k.split(".")[1]: int(v.shape[0]) for k, v in state.items() if k.startswith("heads.") and k.endswith(".weight")}


def receive_model(config: RunConfig, role: ClientRole, msg: Message, num_labels: int) -> MultiHeadEncoder:
    """Build the model skeleton from the received heads' shapes and load the global weights into it.

    With init 'permuted', the first round's weights are replaced by this client's own permutation of them. Weights
    that never change (the LoRA base, frozen word embeddings) are not sent: the client loads its own copy once and
    checks it against the server's hash.
    """
    state = msg.content["arrays"].to_torch_state_dict()
    if int(msg.content["config"].get("server-round", 0)) == 1:
        state = client_start(config, state, config.domains.index(role.domain) * role.num_partitions + role.partition_id)
    sizes = head_sizes(state)
    if sizes.get(role.domain) != num_labels:
        raise ConfigError(f"global head for '{role.domain}' has {sizes.get(role.domain)} labels, local data has {num_labels}")
    lora, embeddings = config.lora_settings(), config.sends_word_embeddings
    keeps_base = lora is not None or not embeddings
    model = actor_model(resolve_model(config.model), tuple(sorted(sizes.items())), config.device, keeps_base, lora, seeds.adapter_start(config.seed))
    if keeps_base:
        load_received(model, state, str(msg.content["config"].get("base-digest", "")), embeddings=embeddings)
    else:
        model.load_state_dict(state)
    return model


@lru_cache(maxsize=1)
def actor_model(model_path: str, sizes: tuple[tuple[str, int], ...], device: str, keeps_base: bool, lora: LoraSettings | None, adapter_seed: int) -> MultiHeadEncoder:
    """One model per process, reloaded with each message's weights: building it from the config cost 0.3-0.6 s a
    message. ``train`` leaves no state behind in it (a fresh optimizer each call, eval mode afterwards). When the
    server does not send the frozen weights (``keeps_base``) they are loaded here, from this node's own model files."""
    if not keeps_base:
        return build_skeleton(model_path, dict(sizes), device)
    return with_adapters(build_model(model_path, dict(sizes), adapter_seed, device), lora, adapter_seed)


def use_granted_threads() -> None:
    """Use exactly the CPUs the simulation granted (Ray sets OMP_NUM_THREADS): oversubscription costs 10-35x here."""
    granted = os.environ.get("OMP_NUM_THREADS")
    if granted and granted.isdigit() and int(granted) > 0:
        torch.set_num_threads(int(granted))


def identity_record(role: ClientRole) -> ConfigRecord:
    """Whom a reply comes from: the server merges heads by domain and orders replies by client name."""
    return ConfigRecord({"domain": role.domain, "partition-id": role.partition_id})


def requested_statistic(train_config: ConfigRecord) -> str:
    """The statistic the server's rule asks for ('' for none), refused when this client cannot compute it."""
    statistic = str(train_config.get("statistic", ""))
    if statistic and statistic not in STATISTICS:
        raise ConfigError(f"the server asks for statistic '{statistic}': expected one of {', '.join(STATISTICS)}")
    return statistic


def train_reply(cfg: RunConfig, role: ClientRole, msg: Message) -> Message:
    """Train the received model on this client's partition; reply with the trained weights (poisoned when --attack
    chose this client), the loss and examples trained on, and the statistic the rule asked for."""
    train_data, _, num_labels = client_data(cfg, role)
    model = receive_model(cfg, role, msg, num_labels)
    train_config = msg.content["config"]
    server_round = int(train_config["server-round"])
    statistic = requested_statistic(train_config)
    tag = f"{role.domain}-{role.partition_id}"

    def progress(step: int, _domain: str, loss: float) -> None:
        if step == 0 or (step + 1) % 10 == 0 or step + 1 == cfg.local_steps:
            log.info("client %s round %d step %d/%d loss %.4f", tag, server_round, step + 1, cfg.local_steps, loss)

    seed = seeds.client_training(cfg.seed, server_round, cfg.domains.index(role.domain), role.partition_id)
    freeze_a = bool(train_config.get("freeze-lora-a", False))
    settings = cfg.train_settings(proximal_mu=float(train_config.get("proximal-mu", 0.0)), freeze_lora_a=freeze_a)
    attack = cfg.attack_of(role.domain, role.partition_id)  # None for an honest client; --attack is a measurement tool
    sent = {"freeze_lora_a": freeze_a, "embeddings": cfg.sends_word_embeddings}
    received = client_state(model, role.domain, **sent) if attack else {}
    report = train(model, [(role.domain, training_set(cfg, role))], settings, seed, progress)
    trained = client_state(model, role.domain, **sent)
    content = RecordDict(
        {
            "arrays": ArrayRecord(poison(attack, received, trained, seed) if attack else trained),
            "metrics": MetricRecord({"train-loss": report.mean_loss, "num-examples": report.num_examples}),
            "client": identity_record(role),
        }
    )
    if statistic:
        batches = int(train_config.get("statistic-batches", 1))
        content[statistic] = ArrayRecord(client_statistic(statistic, model, role.domain, train_data, batches, settings, seed))
        log.info("client %s round %d: %s over %d batches", tag, server_round, statistic, batches)
    return Message(content=content, reply_to=msg)


def evaluate_reply(cfg: RunConfig, role: ClientRole, msg: Message) -> Message:
    """Score the received model on this client's domain test set."""
    _, test_data, num_labels = client_data(cfg, role)
    model = receive_model(cfg, role, msg, num_labels)
    score = evaluate(model, role.domain, test_data)
    metrics = MetricRecord({"eval-loss": score.loss, "eval-accuracy": score.accuracy, "num-examples": len(test_data)})
    return Message(content=RecordDict({"metrics": metrics, "client": identity_record(role)}), reply_to=msg)


def query_reply(cfg: RunConfig, role: ClientRole, msg: Message) -> Message:
    """Whom this node serves; unless the query is a roll call, also its domain's label names."""
    client = identity_record(role)
    if not msg.content["config"].get("roll-call", False):
        client["labels"] = list(domain_source(cfg, role.domain).train.label_names)
    return Message(content=RecordDict({"client": client}), reply_to=msg)


def make_client_app(config: RunConfig | None = None) -> ClientApp:
    """A ClientApp bound to `config`, or reading Flower's run config when None (``flwr run``)."""
    app = ClientApp()

    def setup(context: Context) -> tuple[RunConfig, ClientRole]:
        use_granted_threads()
        cfg = config if config is not None else split_run_config(context.run_config).config
        return cfg, client_role(cfg, context.node_config)

    @app.train()
    def train_handler(msg: Message, context: Context) -> Message:
        return train_reply(*setup(context), msg)

    @app.evaluate()
    def evaluate_handler(msg: Message, context: Context) -> Message:
        return evaluate_reply(*setup(context), msg)

    @app.query()
    def query_handler(msg: Message, context: Context) -> Message:
        return query_reply(*setup(context), msg)

    return app
