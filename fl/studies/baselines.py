"""The reference points a merge is judged against, all trained with the federated runs' budget.

base: the frozen pretrained encoder with linear-probe heads (every other model starts from it);
experts: one per domain, trained only on that domain for rounds x local_steps steps and scored on
every domain with each domain's own head (so an expert's other-domain score shows its forgetting);
multi-task: one model trained centrally on all domains, the same steps per domain;
one-shot merges: the experts merged once by a merge rule, as one round with one client per domain (the
federated code path's rule, statistics included); ensemble: each domain routed to its own expert, the upper
bound a single merged model tries to reach.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from fl.data.batches import Encoded, encode
from fl.data.splits import DomainData
from fl.federation.permuted_init import client_start
from fl.modeling.client_statistics import client_statistic
from fl.modeling.evaluation import Scores, evaluate, pooled_features
from fl.modeling.folder import save_merged
from fl.modeling.lora import with_adapters
from fl.modeling.model import MultiHeadEncoder, build_model, cpu_state, load_tokenizer, num_attention_heads
from fl.modeling.peft_merges import PeftCombination, peft_merged
from fl.modeling.probe import fit_probe
from fl.modeling.server_text import server_text
from fl.modeling.training import train
from fl.run import seeds
from fl.run.config import RunConfig
from fl.run.phases import PhaseClock
from strategies.lora import client_keys
from strategies.rules import RuleSetting, settings
from strategies.update import ClientUpdate, MergeContext, ServerText

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]


@dataclass
class Workbench:
    """Everything the phases share: data, tokenised sets, one model object on config.device reused for training and
    scoring (the states that come out of it are CPU copies, ``cpu_state``)."""

    config: RunConfig
    model_path: str
    data: dict[str, DomainData]
    train_sets: dict[str, Encoded]
    test_sets: dict[str, Encoded]
    model: MultiHeadEncoder
    tokenizer: PreTrainedTokenizerBase

    @property
    def label_names(self) -> dict[str, tuple[str, ...]]:
        return {d: self.data[d].train.label_names for d in self.data}

    def score(self, state: Mapping[str, torch.Tensor], domains: Sequence[str] | None = None) -> Scores:
        """`state` scored on every domain's test set, or on `domains` only."""
        self.model.load_state_dict(state)
        return {d: evaluate(self.model, d, self.test_sets[d]) for d in (self.test_sets if domains is None else domains)}

    def text_for(self, setting: RuleSetting) -> ServerText | None:
        """The unlabelled text the server holds, for a rule that learns its merge from it (AdaMerging); else None."""
        return server_text(self.model, self.train_sets) if setting.rule.server_text else None

    def save(self, state: Mapping[str, torch.Tensor], folder: Path) -> None:
        """`state` as a model folder that ``AutoModel.from_pretrained`` (and ``load_merged``) reads."""
        self.model.load_state_dict(state)
        save_merged(self.model, self.tokenizer, folder, self.label_names)


def make_workbench(config: RunConfig, model_path: str, data: dict[str, DomainData]) -> Workbench:
    tokenizer = load_tokenizer(model_path)
    train_sets = {d: encode(tokenizer, v.train.texts, v.train.labels, config.max_length) for d, v in data.items()}
    test_sets = {d: encode(tokenizer, v.test.texts, v.test.labels, config.max_length) for d, v in data.items()}
    model = build_model(model_path, {d: v.num_labels for d, v in data.items()}, config.seed, config.device)
    model = with_adapters(model, config.lora_settings(), seeds.adapter_start(config.seed))
    return Workbench(config, model_path, data, train_sets, test_sets, model, tokenizer)


def fit_base(workbench: Workbench) -> tuple[State, Scores]:
    """Probe heads on the frozen encoder; returns the start state of every other model and its scores."""
    model = workbench.model
    for domain, data in workbench.train_sets.items():
        head = fit_probe(pooled_features(model, data), data.labels, model.heads[domain].out_features)
        model.heads[domain].load_state_dict(head.state_dict())
    state = cpu_state(model)
    return state, workbench.score(state)


def fine_tune(workbench: Workbench, start: State, domains: list[str], steps: int, seed: int, label: str) -> State:
    """Train from `start` on the given domains (one batch of each per step), logging progress."""
    workbench.model.load_state_dict(start)
    tick = time.monotonic()

    def progress(step: int, domain: str, loss: float) -> None:
        if step == 0 or (step + 1) % 20 == 0 or step + 1 == steps:
            log.info("%s: step %d/%d (%s) loss %.4f  %.0fs", label, step + 1, steps, domain, loss, time.monotonic() - tick)

    tasks = [(d, workbench.train_sets[d]) for d in domains]
    train(workbench.model, tasks, workbench.config.train_settings(steps=steps), seed, progress)
    return cpu_state(workbench.model)


FEDAVG = settings(["fedavg"], {})[0]


def expert_updates(workbench: Workbench, setting: RuleSetting, experts: Mapping[str, State], seed: int) -> list[ClientUpdate]:
    """Each expert as the one client of its domain: its encoder and own head, weighted by its domain's training
    examples, with the statistic ``setting``'s rule asks for computed on that domain's training set."""
    config = workbench.config
    batches = int(setting.client_config().get("statistic-batches", 0))
    statistic = setting.rule.statistic
    updates = []
    for domain, state in experts.items():
        stats = {}
        if statistic is not None:
            workbench.model.load_state_dict(state)
            stats = client_statistic(statistic.name, workbench.model, domain, workbench.train_sets[domain], batches, config.train_settings(), seed)
        own = {key: state[key] for key in client_keys(state, domain, embeddings=config.sends_word_embeddings)}
        updates.append(ClientUpdate(domain, domain, own, float(len(workbench.train_sets[domain])), stats))
    return updates


def merge_updates(workbench: Workbench, setting: RuleSetting, start: State, updates: Sequence[ClientUpdate], seed: int) -> State:
    """``updates`` merged once by ``setting``'s rule from ``start``, as one round; keys no update holds (the heads of
    domains not merged) stay as in ``start``."""
    context = MergeContext(1, seed, num_attention_heads(workbench.model_path), server_text=workbench.text_for(setting), adapter_scale=workbench.config.adapter_scale)
    merged = dict(start)
    merged.update(setting.merge(start, list(updates), context))
    return merged


def one_shot(workbench: Workbench, setting: RuleSetting | PeftCombination, start: State, experts: Mapping[str, State], seed: int) -> State:
    """The experts merged once by ``setting``'s rule from ``start``: one client per domain (``expert_updates``); or,
    for LoRA experts, by one of PEFT's own combinations, each weighted by its domain's training examples."""
    if isinstance(setting, PeftCombination):
        weights = {d: float(len(workbench.train_sets[d])) for d in experts}
        return peft_merged(workbench.model, start, experts, weights, setting)
    return merge_updates(workbench, setting, start, expert_updates(workbench, setting, experts, seed), seed)


def train_experts(workbench: Workbench, start: State, clock: PhaseClock) -> dict[str, State]:
    """One expert per domain, each fine-tuned on its domain alone for the federated runs' budget (rounds x local
    steps) from its first client's start."""
    config = workbench.config
    budget = config.rounds * config.local_steps
    experts = {}
    for i, domain in enumerate(config.domains):
        with clock.phase(f"{domain} expert ({budget} steps)"):
            expert_start = client_start(config, start, i * config.clients_per_domain)
            experts[domain] = fine_tune(workbench, expert_start, [domain], budget, seeds.expert_training(config.seed, i), f"{domain} expert")
    return experts


def score_and_save_experts(workbench: Workbench, experts: Mapping[str, State], out: Path) -> dict[str, Scores]:
    """Each expert scored on every domain, by row name, and saved as ``<domain>-expert/`` in `out`."""
    scores = {}
    for domain, expert in experts.items():
        scores[f"{domain}-expert"] = workbench.score(expert)
        workbench.save(expert, out / f"{domain}-expert")
    return scores


def train_multitask(workbench: Workbench, start: State, clock: PhaseClock) -> State:
    """One model trained centrally on every domain, the experts' budget per domain (one batch of each per step)."""
    config = workbench.config
    budget = config.rounds * config.local_steps
    with clock.phase(f"multi-task ({budget} steps per domain)"):
        return fine_tune(workbench, start, config.domains, budget, seeds.multitask_training(config.seed), "multi-task")


def scored_experts(
    workbench: Workbench, start: State, base: Scores, training_seed: int, starts: Mapping[str, State] | None = None
) -> dict[str, Scores]:
    """Base, both experts trained with one training seed (from `starts`, default `start`), and their one-shot
    average, scored: what the seed-spread scripts compare, one training seed at a time."""
    config = workbench.config
    budget = config.rounds * config.local_steps
    experts = {
        d: fine_tune(workbench, (starts or {}).get(d, start), [d], budget, seeds.expert_training(training_seed, i), f"{d} expert")
        for i, d in enumerate(config.domains)
    }
    models = {"base": base, **{f"{d}-expert": workbench.score(s) for d, s in experts.items()}}
    models["one-shot-average"] = workbench.score(one_shot(workbench, FEDAVG, start, experts, training_seed))
    return models


def ensemble(expert_scores: Mapping[str, Scores]) -> Scores:
    """Each domain scored by its own expert."""
    return {domain: scores[domain] for domain, scores in expert_scores.items()}


