"""Experts a user brings: Hugging Face checkpoints loaded as one encoder plus a head per domain.

Three kinds of folder are read. A fedmerge model folder (``save_merged``: the experts ``sims/bio_legal.py``
saves) gives every domain's head, a linear layer on mean-pooled features. A ``...ForSequenceClassification``
checkpoint keeps its own classifier, read exactly as that class reads it (BERT's pooler, RoBERTa's first token):
it becomes the head of the domain the expert serves. A plain encoder has no head; the domains it lacks a head
for get a linear probe fitted on its frozen features (``fit_missing_heads``), as fedmerge's base model does.

A ``Predictor`` is any model fedmerge scores this way (an expert, a weight merge, a distilled student): a
tokenizer, an encoder (``body``) whose weights merge, and a head per domain.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from fl.data.batches import Encoded
from fl.modeling.errors import ModelError
from fl.modeling.evaluation import Score, per_example, score_logits
from fl.modeling.folder import HEADS_FILE, META_FILE, save_merged
from fl.modeling.model import check_model, load_tokenizer, mean_pool
from fl.modeling.probe import fit_probe

log = logging.getLogger(__name__)

MEAN_LINEAR = "mean-pooled linear"
CLASSIFIER_SUFFIX = "ForSequenceClassification"


@dataclass
class Predictor:
    """One model scored per domain: ``heads[d]`` is an ``nn.Linear`` on mean-pooled ``body`` output, or a whole
    ``...ForSequenceClassification`` model whose own base model holds the same weights as ``body``."""

    name: str
    tokenizer: PreTrainedTokenizerBase
    body: PreTrainedModel
    heads: dict[str, nn.Module]
    serves: tuple[str, ...] = ()  # the domains it is the expert of (empty for merges and students)
    source: str = ""  # the folder or hub id it came from
    labels: dict[str, list[str]] = field(default_factory=dict)  # label names of each head, when the checkpoint has them

    @property
    def config(self) -> PretrainedConfig:
        return self.body.config

    def head_kind(self, domain: str) -> str:
        head = self.heads[domain]
        return MEAN_LINEAR if isinstance(head, nn.Linear) else f"{type(head).__name__} classifier"

    def body_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.body.state_dict().items()}

    def to(self, device: str) -> Predictor:
        self.body.to(device)
        for head in self.heads.values():
            head.to(device)
        return self

    def features(self, data: Encoded) -> torch.Tensor:
        """Mean-pooled body output per example (data order), on the CPU."""
        self.body.eval()
        device = next(self.body.parameters()).device

        def embed(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            ids, mask = ids.to(device), mask.to(device)
            return mean_pool(self.body(input_ids=ids, attention_mask=mask).last_hidden_state, mask)

        return per_example(data, self.config.hidden_size, embed)

    @torch.no_grad()
    def logits(self, domain: str, data: Encoded) -> torch.Tensor:
        """Domain logits per example (data order), on the CPU; `data` must be encoded with this tokenizer."""
        head = self.heads[domain]
        if isinstance(head, nn.Linear):
            return head(self.features(data).to(head.weight.device)).cpu()
        head.eval()
        device = next(head.parameters()).device
        return per_example(data, head.config.num_labels,
                           lambda ids, mask: head(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float())

    def score(self, domain: str, data: Encoded) -> Score:
        return score_logits(self.logits(domain, data), data.labels)


def is_classifier_checkpoint(config: PretrainedConfig) -> bool:
    return any(a.endswith(CLASSIFIER_SUFFIX) for a in (getattr(config, "architectures", None) or []))


def check_expert(path: str) -> str:
    """The resolved folder or hub id of an expert, refused in one line when it has no config."""
    try:
        return check_model(path)
    except ModelError as error:
        raise ModelError(str(error).replace("--model", "--experts")) from None


def load_expert(path: str, serves: Sequence[str], name: str = "") -> Predictor:
    """An expert as a Predictor serving `serves` (float32, on the CPU): heads from a fedmerge folder, or the
    checkpoint's classifier for the one domain it serves; a plain encoder comes without heads."""
    resolved = check_expert(path)
    name = name or Path(path.rstrip("/")).name
    tokenizer = load_tokenizer(resolved)
    folder = Path(resolved)
    if (folder / META_FILE).is_file():
        from safetensors.torch import load_file

        meta = json.loads((folder / META_FILE).read_text())
        labels = {d: list(info["labels"]) for d, info in meta["domains"].items()}
        body = AutoModel.from_pretrained(resolved).float()
        weights = load_file(str(folder / HEADS_FILE))
        heads: dict[str, nn.Module] = {}
        for domain, names in labels.items():
            head = nn.Linear(body.config.hidden_size, len(names))
            head.load_state_dict({"weight": weights[f"{domain}.weight"], "bias": weights[f"{domain}.bias"]})
            heads[domain] = head
        for domain, sub in meta.get("classifiers", {}).items():  # written by save_predictor
            heads[domain] = AutoModelForSequenceClassification.from_pretrained(folder / sub).float()
            labels[domain] = [str(heads[domain].config.id2label[i]) for i in range(heads[domain].config.num_labels)]
        return Predictor(name, tokenizer, body, heads, tuple(serves), resolved, labels)
    config = AutoConfig.from_pretrained(resolved)
    if is_classifier_checkpoint(config):
        if len(serves) != 1:
            raise ModelError(f"--experts {path}: a {config.architectures[0]} checkpoint has one classifier; expected it to serve one domain, not {len(serves)}")
        classifier = AutoModelForSequenceClassification.from_pretrained(resolved).float()
        labels = [str(classifier.config.id2label[i]) for i in range(classifier.config.num_labels)]
        return Predictor(name, tokenizer, classifier.base_model, {serves[0]: classifier}, tuple(serves), resolved, {serves[0]: labels})
    return Predictor(name, tokenizer, AutoModel.from_pretrained(resolved).float(), {}, tuple(serves), resolved)


def check_heads(expert: Predictor, label_names: Mapping[str, Sequence[str]]) -> None:
    """A head must predict its domain's labels: as many outputs, and, where the checkpoint names its labels (not
    transformers' placeholders LABEL_0...), the same names in the same order (one line naming both)."""
    for domain, head in expert.heads.items():
        if domain not in label_names:
            continue
        expected = list(label_names[domain])
        outputs = head.out_features if isinstance(head, nn.Linear) else head.config.num_labels
        if outputs != len(expected):
            raise ModelError(
                f"--experts {expert.source}: its {domain} head has {outputs} outputs; expected {len(expected)} "
                f"(the labels of the {domain} data)"
            )
        named = expert.labels.get(domain, [])
        if named and named != [f"LABEL_{i}" for i in range(len(named))] and named != expected:
            raise ModelError(
                f"--experts {expert.source}: its {domain} head predicts {', '.join(named[:4])}...; expected the {domain} "
                f"data's labels in their order: {', '.join(expected[:4])}..."
            )


def fit_missing_heads(predictor: Predictor, train_sets: Mapping[str, Encoded], num_labels: Mapping[str, int]) -> list[str]:
    """Fit a linear probe on the frozen features for every domain the predictor has no head for; the domains
    fitted (so the report can say which scores come from a probe)."""
    fitted = []
    for domain, data in train_sets.items():
        if domain not in predictor.heads:
            predictor.heads[domain] = fit_probe(predictor.features(data), data.labels, num_labels[domain])
            fitted.append(domain)
    return fitted


def with_body(template: nn.Module, state: Mapping[str, torch.Tensor], vocab_size: int) -> nn.Module:
    """A copy of `template` (an encoder, or a classifier whose base model is one) holding `state` in its encoder,
    resized to `vocab_size` input tokens first; keys `state` lacks keep the template's values."""
    model = copy.deepcopy(template)
    body = model.base_model if hasattr(model, "base_model") else model
    if body.get_input_embeddings().weight.shape[0] != vocab_size:
        body.resize_token_embeddings(vocab_size, mean_resizing=False)  # every row is loaded from `state` next
    own = body.state_dict()
    unknown = [k for k in state if k not in own]
    if unknown:
        raise ValueError(f"merged keys not in the {type(body).__name__} they go into: {unknown[:3]}")
    own.update({k: v for k, v in state.items()})
    body.load_state_dict(own)
    return model


def save_predictor(predictor: Predictor, out: Path, label_names: Mapping[str, Sequence[str]]) -> Path:
    """fedmerge's model folder (``save_merged``: AutoModel loads the encoder; mean-pooled linear heads in
    heads.safetensors); a domain whose head is a checkpoint classifier gets that whole classifier, holding this
    encoder, in ``<domain>-classifier/`` (AutoModelForSequenceClassification loads it; fedmerge.json names it)."""
    from fl.modeling.model import MultiHeadEncoder

    linear = {d: h for d, h in predictor.heads.items() if isinstance(h, nn.Linear)}
    model = MultiHeadEncoder(predictor.body, {d: h.out_features for d, h in linear.items()})
    for domain, head in linear.items():
        model.heads[domain].load_state_dict(head.state_dict())
    save_merged(model, predictor.tokenizer, out, {d: label_names[d] for d in linear})
    classifiers = {d: f"{d}-classifier" for d in predictor.heads if d not in linear}
    for domain, sub in classifiers.items():
        predictor.heads[domain].save_pretrained(out / sub)
        predictor.tokenizer.save_pretrained(out / sub)
    if classifiers:  # load_expert reads them back as those domains' heads
        meta = json.loads((out / META_FILE).read_text())
        (out / META_FILE).write_text(json.dumps({**meta, "classifiers": classifiers}, indent=2))
    return out
