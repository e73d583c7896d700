"""Weight merges of experts a user brings, with the registry's rules, in one vocabulary.

Each expert becomes one client of a one-shot merge (the same ``Rule.merge`` path, checks included, as the
federated rounds and the headline's one-shot rows): it sends its encoder (``encoder.<key>``) and the mean-pooled
linear heads of the domains it serves, with weight 1. The global state is ``--base`` when given (task vectors
are differences from it), else the first expert. When vocabularies differ, every input embedding is first
remapped token by token into the merged vocabulary (``--vocab first|union``, fl.experts.vocabulary): a row shared by
several experts is merged by the rule, a row only one expert has is taken from it unchanged. A rule that
cannot apply is refused with one line (``refusal``), never run on weights it would garble.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from fl.data.batches import Encoded
from fl.experts.compatibility import Compatibility
from fl.experts.loading import MEAN_LINEAR, Predictor, with_body
from fl.experts.vocabulary import fill_missing, input_embedding_key, keep_single_source, merged_tokenizer, merged_tokens, remap_rows
from fl.modeling.client_statistics import client_statistic
from fl.modeling.model import MultiHeadEncoder
from fl.modeling.train_settings import TrainSettings
from strategies.permutation import permutation_spec
from strategies.rules import RuleSetting
from strategies.update import ClientUpdate, MergeContext

PREFIX = "encoder."
# Classifiers that read the pooler's output, which a residual-stream permutation leaves unchanged; every other
# checkpoint classifier reads hidden states directly and would be scrambled by it.
POOLER_CLASSIFIERS = frozenset({"BertForSequenceClassification"})
State = dict[str, torch.Tensor]


@dataclass
class MergeInputs:
    """The experts' encoders and heads as clients of one merge, in the merged vocabulary."""

    tokenizer: PreTrainedTokenizerBase
    vocab_size: int
    states: list[State]  # per expert: encoder.* (remapped, missing rows filled) + heads.<domain>.* it serves
    start: State  # the global state: base or first expert, with every served domain's head
    remapped: list[tuple[torch.Tensor, torch.Tensor]] | None  # per expert (rows, present) when vocabularies differ
    embedding_key: str  # the prefixed input embedding key


def linear_heads(expert: Predictor) -> State:
    return {f"heads.{d}.{k}": v.detach() for d in expert.serves if isinstance(expert.heads.get(d), nn.Linear)
            for k, v in expert.heads[d].state_dict().items()}


def prepare(experts: Sequence[Predictor], base: Predictor | None, vocab: str) -> MergeInputs:
    """Clients' states in one vocabulary (call only when the compatibility report allows weight merges)."""
    key = input_embedding_key(experts[0].body)
    vocabs = [e.tokenizer.get_vocab() for e in experts]
    states = [{PREFIX + k: v for k, v in e.body_state().items()} for e in experts]
    same = all(v == vocabs[0] for v in vocabs)
    tokenizer, remapped = experts[0].tokenizer, None
    base_state = {PREFIX + k: v for k, v in base.body_state().items()} if base is not None else None
    if not same or (base is not None and base.tokenizer.get_vocab() != vocabs[0]):
        tokens = merged_tokens(vocabs, vocab)
        tokenizer = merged_tokenizer([e.tokenizer for e in experts], vocab)
        remapped = [remap_rows(s[PREFIX + key], v, tokens) for s, v in zip(states, vocabs)]
        for state, rows in zip(states, fill_missing(remapped)):
            state[PREFIX + key] = rows
        if base_state is not None:
            rows, present = remap_rows(base_state[PREFIX + key], base.tokenizer.get_vocab(), tokens)
            mean = torch.stack([s[PREFIX + key] for s in states]).mean(dim=0)
            base_state[PREFIX + key] = torch.where(present.unsqueeze(1), rows, mean)
    for state, expert in zip(states, experts):
        state.update(linear_heads(expert))
    start = dict(base_state if base_state is not None else states[0])
    for expert in reversed(experts):  # each head from the first expert serving its domain
        start.update(linear_heads(expert))
    return MergeInputs(tokenizer, len(tokenizer.get_vocab()) if remapped else experts[0].body.get_input_embeddings().weight.shape[0],
                       states, start, remapped, PREFIX + key)


def refusal(setting: RuleSetting, report: Compatibility, experts: Sequence[Predictor], base: Predictor | None) -> str:
    """Why `setting` cannot merge these experts, as one line ('' when it can)."""
    rule, name = setting.rule, setting.name
    if not rule.one_shot:
        return f"{name}: acts during federated rounds (use when: {rule.use_when}), not on finished experts"
    if report.blocker:
        return f"{name}: weights cannot be averaged: {report.blocker}"
    if rule.deltas and base is None:
        return f"{name}: needs --base: its task vectors are differences from the experts' common base"
    if rule.deltas and report.base_blocker:
        return f"{name}: --base cannot be merged with the experts: {report.base_blocker}"
    classifiers = [(e.name, d, e.head_kind(d)) for e in experts for d in e.serves if e.head_kind(d) != MEAN_LINEAR]
    if rule.statistic is not None:
        if not report.same_vocabulary:
            return f"{name}: its {rule.statistic.name} statistics live in each expert's own vocabulary, and the vocabularies differ"
        if classifiers:
            return f"{name}: computes statistics through mean-pooled linear heads; {classifiers[0][0]}'s {classifiers[0][1]} head is a {classifiers[0][2]}"
    if rule.name == "aligned":
        try:
            permutation_spec({PREFIX + k: v for k, v in experts[0].body_state().items()}, int(experts[0].config.num_attention_heads))
        except ValueError as error:
            return f"{name}: weight matching has no permutation table for this encoder ({str(error).splitlines()[0]})"
        residual = bool(setting.values.get("residual", False))
        scrambled = [c for c in classifiers if residual and c[2].split()[0] not in POOLER_CLASSIFIERS]
        if scrambled:
            return f"{name}: {scrambled[0][0]}'s {scrambled[0][1]} head ({scrambled[0][2]}) reads hidden states that a residual permutation reorders; use --aligned-residual false"
    return ""


def merge(
    setting: RuleSetting, inputs: MergeInputs, experts: Sequence[Predictor], train_sets: Sequence[Mapping[str, Encoded]],
    settings: TrainSettings, seed: int,
) -> State:
    """The merged state (every key of the global state) after one round of `setting` with one client per expert;
    `train_sets[i]` are the training sets encoded with expert i's tokenizer (for rules that need statistics)."""
    statistic = setting.rule.statistic
    batches = int(setting.client_config().get("statistic-batches", 0))
    clients = []
    for i, (expert, state) in enumerate(zip(experts, inputs.states)):
        stats: dict[str, torch.Tensor] = {}
        for domain in expert.serves if statistic is not None else ():
            model = MultiHeadEncoder(expert.body, {domain: expert.heads[domain].out_features})
            model.heads[domain].load_state_dict(expert.heads[domain].state_dict())
            for k, v in client_statistic(statistic.name, model, domain, train_sets[i][domain], batches, settings, seed).items():
                stats[k] = stats.get(k, 0) + v
        clients.append(ClientUpdate(f"expert {i + 1} ({expert.name})", expert.name, state, 1.0, stats))
    context = MergeContext(1, seed, int(experts[0].config.num_attention_heads))
    merged = dict(inputs.start)
    merged.update(setting.merge(inputs.start, clients, context))
    if inputs.remapped is not None:
        merged[inputs.embedding_key] = keep_single_source(merged[inputs.embedding_key], inputs.remapped)
    return merged


def merged_predictor(name: str, state: State, experts: Sequence[Predictor], inputs: MergeInputs) -> Predictor:
    """The merged encoder with each domain's head: the merged linear head, or the serving expert's own
    classifier holding the merged encoder."""
    body_state = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}

    def own_keys(template: nn.Module) -> State:  # keys some other expert has (a pooler) stay out of this one
        keys = template.base_model.state_dict().keys()
        return {k: v for k, v in body_state.items() if k in keys}

    body = with_body(experts[0].body, own_keys(experts[0].body), inputs.vocab_size)
    heads: dict[str, nn.Module] = {}
    for expert in experts:
        for domain in expert.serves:
            if domain in heads:
                continue
            head = expert.heads[domain]
            if isinstance(head, nn.Linear):
                heads[domain] = nn.Linear(head.in_features, head.out_features)
                heads[domain].load_state_dict({"weight": state[f"heads.{domain}.weight"], "bias": state[f"heads.{domain}.bias"]})
            else:
                heads[domain] = with_body(head, own_keys(head), inputs.vocab_size)
    return Predictor(name, inputs.tokenizer, body, heads)
