"""Bring your own experts: diagnose, merge what can be merged, ensemble, and distil the ensemble into one model.

The study a user with finished checkpoints runs (``sims/merge_experts.py``): the compatibility report first
(fl.experts.compatibility), then every requested weight merge that the report allows (fl.experts.merge; the others are
skipped with their reason), the output ensemble (each domain's logits from the expert or experts that serve
it), and with distillation one student trained to match the ensemble on unlabelled text (FedDF, Lin et al.
2020, fl.modeling.distillation), which works whatever the experts share because only text and logits cross. Every model
is scored on every domain's test set and reported as the headline is: results.json, results.md, a plot and a
model folder per produced model.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fl.run import files
from fl.data.batches import Encoded, encode
from fl.experts.compatibility import Compatibility, compatibility, moved_units
from fl.run.config import RunConfig
from fl.data.splits import DomainData
from fl.modeling.distillation import DistillSettings, distill, fit_heads_to_teacher, kl_to_teacher
from fl.modeling.evaluation import Score, score_logits
from fl.experts.merge import MergeInputs, merge, merged_predictor, prepare, refusal
from fl.experts.loading import Predictor, check_heads, fit_missing_heads, load_expert, save_predictor
from fl.modeling.model import ModelError, MultiHeadEncoder, save_merged
from fl.run.phases import PhaseClock
from fl.studies.report import markdown, plot_scores, table_row, versus
from fl.run.files import write_results
from fl.experts.vocabulary import VocabularyError
from strategies.rules import RuleSetting

log = logging.getLogger(__name__)
Scores = dict[str, Score]
STUDENTS = ("auto", "merge", "base")  # or one of the experts


class NothingToProduce(ModelError):
    """Every requested merge was refused and no distillation was asked for: no single model can come out."""


@dataclass(frozen=True)
class StudyOptions:
    experts: tuple[str, ...]  # folders or hub ids
    serves: tuple[tuple[str, ...], ...]  # the domains each expert serves
    base: str = ""  # the experts' common base ('' = none given)
    vocab: str = "first"  # the merged model's vocabulary: the first expert's, or the union (WordPiece)
    distill: bool = False
    distill_steps: int = 160
    distill_temperature: float = 2.0
    distill_texts: tuple[str, ...] = ()  # unlabelled transfer set; empty = every domain's training texts
    student: str = "auto"  # auto: the best weight merge, else the base, else the first expert

    def record(self) -> dict[str, object]:
        values = dataclasses.asdict(self)
        values["distill_texts"] = len(self.distill_texts)
        return {k.replace("_", "-"): v for k, v in values.items()}


def row_names(experts: Sequence[Predictor]) -> list[str]:
    """'<domain>-expert' for an expert that alone serves one domain (the headline's names), else its folder name."""
    servers = [d for e in experts for d in e.serves]
    return [f"{e.serves[0]}-expert" if len(e.serves) == 1 and servers.count(e.serves[0]) == 1 else e.name for e in experts]


class Encodings:
    """Each data split encoded once per tokenizer object (merges share their first expert's, or the merged one)."""

    def __init__(self, config: RunConfig, data: Mapping[str, DomainData], distill_texts: Sequence[str]) -> None:
        self.config, self.data, self.distill_texts = config, data, tuple(distill_texts)
        self._cache: dict[tuple[str, int], tuple[object, dict[str, Encoded]]] = {}  # keeps each tokenizer alive: ids stay unique

    def split(self, predictor: Predictor, split: str) -> dict[str, Encoded]:
        """'train', 'test', or 'transfer' (the unlabelled distillation texts, the same for every domain when given)."""
        tokenizer, key = predictor.tokenizer, (split, id(predictor.tokenizer))
        if key not in self._cache:
            found = {}
            for d, v in self.data.items():
                if split == "transfer":
                    texts, labels = self.distill_texts or v.train.texts, None
                else:
                    texts, labels = getattr(v, split).texts, getattr(v, split).labels
                found[d] = encode(tokenizer, texts, [0] * len(texts) if labels is None else labels, self.config.max_length)
            self._cache[key] = (tokenizer, found)
        return self._cache[key][1]


def ensemble_logits(experts: Sequence[Predictor], encodings: Encodings, split: str) -> dict[str, torch.Tensor]:
    """Per domain, the mean of the logits of the experts serving it, each on its own tokenisation."""
    domains = encodings.data.keys()
    return {
        d: torch.stack([e.logits(d, encodings.split(e, split)[d]) for e in experts if d in e.serves]).mean(dim=0)
        for d in domains
    }


def build_student(source: Predictor, num_labels: Mapping[str, int]) -> tuple[MultiHeadEncoder, list[str]]:
    """A multi-head copy of `source`'s encoder; its mean-pooled linear heads are kept, the domains without one
    are returned (their heads get fitted to the teachers)."""
    student = MultiHeadEncoder(copy.deepcopy(source.body), num_labels)
    missing = []
    for domain in num_labels:
        head = source.heads.get(domain)
        if isinstance(head, nn.Linear):
            student.heads[domain].load_state_dict(head.state_dict())
        else:
            missing.append(domain)
    return student.float(), missing


def applicable(rules: Sequence[RuleSetting], report: Compatibility, experts: Sequence[Predictor], base: Predictor | None,
               vocab_problem: str) -> tuple[list[RuleSetting], dict[str, str]]:
    runnable, refused = [], {}
    for setting in rules:
        reason = refusal(setting, report, experts, base)
        if not reason and vocab_problem and setting.rule.one_shot:
            reason = f"{setting.name}: {vocab_problem}"
        if reason:
            refused[setting.name] = reason
        else:
            runnable.append(setting)
    return runnable, refused


def score_all(predictor: Predictor, encodings: Encodings) -> Scores:
    return {d: predictor.score(d, data) for d, data in encodings.split(predictor, "test").items()}


def pick_student(choice: str, merges: Mapping[str, Predictor], models: Mapping[str, Scores], experts: Mapping[str, Predictor],
                 base: Predictor | None) -> Predictor:
    """--student: 'auto' is the weight merge with the best mean accuracy, else the base, else the first expert;
    `experts` by their --experts entry."""
    def mean(name: str) -> float:
        return sum(s.accuracy for s in models[name].values()) / len(models[name])

    if choice in ("auto", "merge") and merges:
        return merges[max(merges, key=mean)]
    if choice in ("auto", "base") and base is not None:
        return base
    if choice == "auto":
        return next(iter(experts.values()))
    return experts[choice]


def run_distillation(
    config: RunConfig, options: StudyOptions, experts: Sequence[Predictor], source: Predictor, num_labels: Mapping[str, int],
    encodings: Encodings,
) -> tuple[MultiHeadEncoder, dict[str, object]]:
    """The student trained on the transfer texts to match the ensemble's logits, and what happened (KL before
    and after, heads fitted to the teachers, losses)."""
    teachers = ensemble_logits(experts, encodings, "transfer")
    student, unheaded = build_student(source, num_labels)
    student.to(config.device)
    inputs = encodings.split(source, "transfer")
    if unheaded:
        fit_heads_to_teacher(student, inputs, teachers, unheaded)
    settings = DistillSettings(options.distill_steps, config.batch_size, temperature=options.distill_temperature,
                               schedule=config.lr_schedule, freeze_word_embeddings=config.freeze_word_embeddings)
    before = kl_to_teacher(student, inputs, teachers, settings.temperature)
    tick = time.monotonic()

    def progress(step: int, domain: str, loss: float) -> None:
        if step == 0 or (step + 1) % 20 == 0 or step + 1 == settings.steps:
            log.info("distillation: step %d/%d (%s) loss %.4f  %.0fs", step + 1, settings.steps, domain, loss, time.monotonic() - tick)

    report = distill(student, inputs, teachers, settings, config.seed, progress)
    after = kl_to_teacher(student, inputs, teachers, settings.temperature)
    return student, {
        "student-from": source.name, "steps": settings.steps, "temperature": settings.temperature,
        "transfer-texts": {d: len(v) for d, v in inputs.items()}, "heads-fitted-to-teachers": unheaded,
        "kl-before": before, "kl-after": after, "first-loss": report.losses[0], "last-loss": report.losses[-1],
    }


def merge_row(setting: RuleSetting) -> str:
    """The row of a one-shot merge, named as in the headline's table."""
    return "one-shot-average" if setting.name == "fedavg" else f"one-shot-{setting.name}"


def run_study(
    config: RunConfig, options: StudyOptions, rules: Sequence[RuleSetting], data: Mapping[str, DomainData], out: Path,
    versions: Mapping[str, str], announce: Callable[[str], None] = print,
) -> dict[str, object]:
    """Everything after the inputs passed their checks; raises NothingToProduce (before any scoring) when no
    single model can come out. `announce` shows the report and the skipped rules."""
    clock = PhaseClock()
    torch.manual_seed(config.seed)
    num_labels = {d: v.num_labels for d, v in data.items()}
    label_names = {d: list(v.train.label_names) for d, v in data.items()}
    with clock.phase("load experts"):
        experts = [load_expert(p, serves) for p, serves in zip(options.experts, options.serves)]
        names = row_names(experts)
        for expert, name in zip(experts, names):
            expert.name = name
            check_heads(expert, label_names)
        base = load_expert(options.base, (), "base") if options.base else None
    with clock.phase("compatibility report"):
        report = compatibility(experts, base)
        inputs: MergeInputs | None = None
        vocab_problem = ""
        if not report.blocker:
            try:
                inputs = prepare(experts, base, options.vocab)
            except VocabularyError as error:
                vocab_problem = str(error)
        if inputs is not None:
            heads = int(experts[0].config.num_attention_heads)
            try:
                moved = {n: moved_units(inputs.states[0], s, heads, config.seed) for n, s in zip(names[1:], inputs.states[1:])}
            except ValueError:  # an encoder family weight matching has no table for: nothing to say
                moved = {}
            report = dataclasses.replace(report, moved_units=moved)
        runnable, refused = applicable(rules, report, experts, base, vocab_problem)
    announce("compatibility of the experts:")
    for line in report.lines():
        announce(line)
    for reason in refused.values():
        announce(f"skipped {reason}")
    if not runnable and not options.distill:
        raise NothingToProduce("nothing to produce: every requested weight merge was skipped (reasons above); add --distill to train one student from the ensemble")
    if options.student == "merge" and not runnable:
        raise NothingToProduce("--student merge: no weight merge applies to these experts (reasons above); expected base, auto or an expert's name")
    if options.student == "base" and base is None:
        raise NothingToProduce("--student base: no --base given; expected --base, or --student auto|merge|<expert>")

    encodings = Encodings(config, data, options.distill_texts)
    for predictor in [*experts, *([base] if base else [])]:
        predictor.to(config.device)
    models: dict[str, Scores] = {}
    probed: dict[str, list[str]] = {}
    with clock.phase("score the experts, the base and the ensemble (probe heads where one is missing)"):
        for predictor in [*([base] if base else []), *experts]:
            probed[predictor.name] = fit_missing_heads(predictor, encodings.split(predictor, "train"), num_labels)
            models[predictor.name] = score_all(predictor, encodings)
        ensemble = ensemble_logits(experts, encodings, "test")
        labels = {d: e.labels for d, e in encodings.split(experts[0], "test").items()}
        models["ensemble"] = {d: score_logits(ensemble[d], labels[d]) for d in data}
    merges: dict[str, Predictor] = {}
    for setting in runnable:
        row = merge_row(setting)
        with clock.phase(f"{row} of the experts"):
            train_sets = [encodings.split(e, "train") for e in experts]
            state = merge(setting, inputs, experts, train_sets, config.train_settings(), config.seed)
            merged = merged_predictor(row, state, experts, inputs).to(config.device)
            models[row] = score_all(merged, encodings)
            save_predictor(merged, out / row, label_names)
            merges[row] = merged
    produced = list(merges)
    distillation: dict[str, object] = {}
    if options.distill:
        source = pick_student(options.student, merges, models, dict(zip(options.experts, experts)), base)
        row = f"distilled-{source.name}"
        with clock.phase(f"distil the ensemble into {source.name} ({options.distill_steps} steps)"):
            student, distillation = run_distillation(config, options, experts, source, num_labels, encodings)
            models[row] = score_all(Predictor(row, source.tokenizer, student.encoder, dict(student.heads.items())), encodings)
            save_merged(student, source.tokenizer, out / row, label_names)
            produced.append(row)
    with clock.phase("report"):
        domains = list(data)
        order = [*(["base"] if base else []), *names, "ensemble", *produced]
        rows = [table_row(n, models[n], models["ensemble"], config.seed) for n in order]
        compared = versus(models, domains, [(n, "ensemble") for n in produced], config.seed)
        header = f"# Bring your own experts: {', '.join(names)}" + (f" (base {options.base})" if base else "") + f", vocabulary {options.vocab}, seed {config.seed}"
        notes = ["Normalised: accuracy / the ensemble's on each domain (the ensemble routes each domain to the expert(s) serving it)."]
        notes += [f"{n} has no head for {', '.join(ds)}: scored there with a linear probe on its frozen features." for n, ds in probed.items() if ds]
        notes += [f"Skipped {r}" for r in refused.values()]
        if distillation:
            kl = ", ".join(f"{d} {distillation['kl-before'][d]:.4f} -> {distillation['kl-after'][d]:.4f}" for d in domains)
            notes.append(f"Distillation into {distillation['student-from']}, {distillation['steps']} steps: KL to the ensemble on the transfer texts {kl}.")
        text = markdown(rows, [], domains, header, compared, sizes={d: (len(v.train), len(v.test)) for d, v in data.items()},
                        compared_title="against the ensemble")
        text += "\n## Compatibility\n\n```\n" + "\n".join(report.lines()) + "\n```\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
        files.write_text(out / "results.md", text)
        plot_scores(out / "scores.png", {n: models[n] for n in order}, domains)
    results = {
        "config": config.to_record(),
        "study": options.record(),
        "versions": dict(versions),
        "experts": [{"row": e.name, "source": e.source, "serves": list(e.serves), "heads": {d: e.head_kind(d) for d in e.heads},
                     "probed": probed.get(e.name, [])} for e in experts],
        "compatibility": report.record(),
        "skipped": refused,
        "merges": {merge_row(s): s.record() for s in runnable},
        "distillation": distillation,
        "domains": {d: {"labels": label_names[d], "train-examples": len(v.train), "test-examples": len(v.test)} for d, v in data.items()},
        "scores": {n: {d: s.summary() for d, s in models[n].items()} for n in order},
        "table": [{"model": r.name, "per-domain": r.per_domain, "mean": r.mean, "normalised": r.normalised} for r in rows],
        "against-ensemble": [{"claim": e.claim, "difference": e.difference, "verdict": e.verdict} for e in compared],
        "model-dirs": {n: str(out / n) for n in produced},
        "wall-seconds": clock.seconds,
    }
    write_results(out / "results.json", results)
    return results
