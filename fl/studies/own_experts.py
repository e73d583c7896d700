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

from fl.data.batches import Encoded, encode
from fl.data.splits import DomainData
from fl.experts.compatibility import Compatibility, compatibility, moved_units
from fl.experts.loading import Predictor, check_heads, fit_missing_heads, load_expert, save_predictor
from fl.experts.merge import MergeInputs, merge, merged_predictor, prepare, refusal
from fl.experts.vocabulary import VocabularyError
from fl.modeling.distillation import DistillSettings, distill, fit_heads_to_teacher, kl_to_teacher
from fl.modeling.errors import ModelError
from fl.modeling.evaluation import Scores, score_logits
from fl.modeling.folder import save_merged
from fl.modeling.model import MultiHeadEncoder
from fl.run import files
from fl.run.config import RunConfig
from fl.run.files import write_results
from fl.run.phases import PhaseClock
from fl.studies.report import Effect, Row, markdown, plot_scores, table_row, versus
from strategies.rules import RuleSetting

log = logging.getLogger(__name__)
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


@dataclass(frozen=True)
class Study:
    """What every step of the study reads: the run's config, the study's options, the data and its encodings, the
    output folder and the phase clock."""

    config: RunConfig
    options: StudyOptions
    data: Mapping[str, DomainData]
    encodings: Encodings
    out: Path
    clock: PhaseClock

    @property
    def num_labels(self) -> dict[str, int]:
        return {d: v.num_labels for d, v in self.data.items()}

    @property
    def label_names(self) -> dict[str, list[str]]:
        return {d: list(v.train.label_names) for d, v in self.data.items()}


@dataclass(frozen=True)
class Diagnosis:
    """The compatibility report and what it means for the requested weight merges."""

    report: Compatibility
    inputs: MergeInputs | None  # the experts' states in one vocabulary; None when none can be built
    runnable: list[RuleSetting]
    refused: dict[str, str]  # rule name -> why it is skipped


@dataclass(frozen=True)
class Findings:
    """What the study loaded, scored and produced: everything its results.md and results.json say."""

    experts: list[Predictor]
    base: Predictor | None
    diagnosis: Diagnosis
    models: dict[str, Scores]  # by table row
    produced: list[str]  # the rows with a model folder: the weight merges, then the distilled student
    probed: dict[str, list[str]]  # predictor -> the domains it has no head for (scored with a probe there)
    distillation: dict[str, object]  # what run_distillation reports; {} without distillation

    @property
    def order(self) -> list[str]:
        """The table's rows: the base, the experts, the ensemble, then the produced models."""
        return [*(["base"] if self.base else []), *(e.name for e in self.experts), "ensemble", *self.produced]


def load_experts(study: Study) -> tuple[list[Predictor], Predictor | None]:
    """The experts, each named as its table row and its heads checked against the data's labels, and the base."""
    options = study.options
    experts = [load_expert(p, serves) for p, serves in zip(options.experts, options.serves)]
    for expert, name in zip(experts, row_names(experts)):
        expert.name = name
        check_heads(expert, study.label_names)
    base = load_expert(options.base, (), "base") if options.base else None
    return experts, base


def units_moved(experts: Sequence[Predictor], inputs: MergeInputs, seed: int) -> dict[str, tuple[int, int]]:
    """Per expert after the first: (units weight matching moves to line it up with the first, units)."""
    heads = int(experts[0].config.num_attention_heads)
    try:
        return {e.name: moved_units(inputs.states[0], s, heads, seed) for e, s in zip(experts[1:], inputs.states[1:])}
    except ValueError:  # an encoder family weight matching has no table for: nothing to say
        return {}


def diagnose(study: Study, experts: Sequence[Predictor], base: Predictor | None, rules: Sequence[RuleSetting]) -> Diagnosis:
    """The compatibility report (with the units weight matching moves, when the experts' states can be joined) and
    the requested merges it allows; a vocabulary that cannot be built refuses the one-shot merges."""
    report = compatibility(experts, base)
    inputs: MergeInputs | None = None
    vocab_problem = ""
    if not report.blocker:
        try:
            inputs = prepare(experts, base, study.options.vocab)
        except VocabularyError as error:
            vocab_problem = str(error)
    if inputs is not None:
        report = dataclasses.replace(report, moved_units=units_moved(experts, inputs, study.config.seed))
    runnable, refused = applicable(rules, report, experts, base, vocab_problem)
    return Diagnosis(report, inputs, runnable, refused)


def announce_diagnosis(diagnosis: Diagnosis, announce: Callable[[str], None]) -> None:
    announce("compatibility of the experts:")
    for line in diagnosis.report.lines():
        announce(line)
    for reason in diagnosis.refused.values():
        announce(f"skipped {reason}")


def check_something_to_produce(options: StudyOptions, diagnosis: Diagnosis, base: Predictor | None) -> None:
    """Raise NothingToProduce when no single model can come out as asked."""
    if not diagnosis.runnable and not options.distill:
        raise NothingToProduce("nothing to produce: every requested weight merge was skipped (reasons above); add --distill to train one student from the ensemble")
    if options.student == "merge" and not diagnosis.runnable:
        raise NothingToProduce("--student merge: no weight merge applies to these experts (reasons above); expected base, auto or an expert's name")
    if options.student == "base" and base is None:
        raise NothingToProduce("--student base: no --base given; expected --base, or --student auto|merge|<expert>")


def score_sources(study: Study, experts: Sequence[Predictor], base: Predictor | None) -> tuple[dict[str, Scores], dict[str, list[str]]]:
    """The base, the experts and their output ensemble scored on every domain, and per predictor the domains it
    has no head for (a probe on its frozen features is fitted there first)."""
    for predictor in [*experts, *([base] if base else [])]:
        predictor.to(study.config.device)
    models: dict[str, Scores] = {}
    probed: dict[str, list[str]] = {}
    with study.clock.phase("score the experts, the base and the ensemble (probe heads where one is missing)"):
        for predictor in [*([base] if base else []), *experts]:
            probed[predictor.name] = fit_missing_heads(predictor, study.encodings.split(predictor, "train"), study.num_labels)
            models[predictor.name] = score_all(predictor, study.encodings)
        ensemble = ensemble_logits(experts, study.encodings, "test")
        labels = {d: e.labels for d, e in study.encodings.split(experts[0], "test").items()}
        models["ensemble"] = {d: score_logits(ensemble[d], labels[d]) for d in study.data}
    return models, probed


def weight_merges(study: Study, diagnosis: Diagnosis, experts: Sequence[Predictor]) -> tuple[dict[str, Predictor], dict[str, Scores]]:
    """Every merge the report allows, by table row, each saved in its model folder, and their scores."""
    merges: dict[str, Predictor] = {}
    scores: dict[str, Scores] = {}
    for setting in diagnosis.runnable:
        row = merge_row(setting)
        with study.clock.phase(f"{row} of the experts"):
            train_sets = [study.encodings.split(e, "train") for e in experts]
            state = merge(setting, diagnosis.inputs, experts, train_sets, study.config.train_settings(), study.config.seed)
            merged = merged_predictor(row, state, experts, diagnosis.inputs).to(study.config.device)
            scores[row] = score_all(merged, study.encodings)
            save_predictor(merged, study.out / row, study.label_names)
            merges[row] = merged
    return merges, scores


def run_distillation(study: Study, experts: Sequence[Predictor], source: Predictor) -> tuple[MultiHeadEncoder, dict[str, object]]:
    """The student trained on the transfer texts to match the ensemble's logits, and what happened (KL before
    and after, heads fitted to the teachers, losses)."""
    config, options, encodings = study.config, study.options, study.encodings
    teachers = ensemble_logits(experts, encodings, "transfer")
    student, unheaded = build_student(source, study.num_labels)
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


def distil_ensemble(
    study: Study, experts: Sequence[Predictor], base: Predictor | None, merges: Mapping[str, Predictor], models: Mapping[str, Scores]
) -> tuple[str, Scores, dict[str, object]]:
    """The ensemble distilled into the --student (pick_student) and saved in its model folder: its row, its scores
    and what happened."""
    options = study.options
    source = pick_student(options.student, merges, models, dict(zip(options.experts, experts)), base)
    row = f"distilled-{source.name}"
    with study.clock.phase(f"distil the ensemble into {source.name} ({options.distill_steps} steps)"):
        student, distillation = run_distillation(study, experts, source)
        scores = score_all(Predictor(row, source.tokenizer, student.encoder, dict(student.heads.items())), study.encodings)
        save_merged(student, source.tokenizer, study.out / row, study.label_names)
    return row, scores, distillation


def merge_row(setting: RuleSetting) -> str:
    """The row of a one-shot merge, named as in the headline's table."""
    return "one-shot-average" if setting.name == "fedavg" else f"one-shot-{setting.name}"


def results_markdown(study: Study, findings: Findings, rows: Sequence[Row], compared: Sequence[Effect]) -> str:
    """results.md: the table against the ensemble, the compatibility report, and notes on probes, skipped merges and
    the distillation."""
    options, domains, distillation = study.options, list(study.data), findings.distillation
    names = [e.name for e in findings.experts]
    header = f"# Bring your own experts: {', '.join(names)}" + (f" (base {options.base})" if findings.base else "") + f", vocabulary {options.vocab}, seed {study.config.seed}"
    notes = ["Normalised: accuracy / the ensemble's on each domain (the ensemble routes each domain to the expert(s) serving it)."]
    notes += [f"{n} has no head for {', '.join(ds)}: scored there with a linear probe on its frozen features." for n, ds in findings.probed.items() if ds]
    notes += [f"Skipped {r}" for r in findings.diagnosis.refused.values()]
    if distillation:
        kl = ", ".join(f"{d} {distillation['kl-before'][d]:.4f} -> {distillation['kl-after'][d]:.4f}" for d in domains)
        notes.append(f"Distillation into {distillation['student-from']}, {distillation['steps']} steps: KL to the ensemble on the transfer texts {kl}.")
    text = markdown(rows, [], domains, header, compared, sizes={d: (len(v.train), len(v.test)) for d, v in study.data.items()},
                    compared_title="against the ensemble")
    return text + "\n## Compatibility\n\n```\n" + "\n".join(findings.diagnosis.report.lines()) + "\n```\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def write_report(study: Study, findings: Findings) -> tuple[list[Row], list[Effect]]:
    """results.md and scores.png; returns the table's rows and the comparisons with the ensemble."""
    models, domains = findings.models, list(study.data)
    rows = [table_row(n, models[n], models["ensemble"], study.config.seed) for n in findings.order]
    compared = versus(models, domains, [(n, "ensemble") for n in findings.produced], study.config.seed)
    files.write_text(study.out / "results.md", results_markdown(study, findings, rows, compared))
    plot_scores(study.out / "scores.png", {n: models[n] for n in findings.order}, domains)
    return rows, compared


def results_record(
    study: Study, findings: Findings, rows: Sequence[Row], compared: Sequence[Effect], versions: Mapping[str, str]
) -> dict[str, object]:
    """results.json: the config, the study's options, the report, every model's scores, the table and the comparisons."""
    diagnosis, models = findings.diagnosis, findings.models
    return {
        "config": study.config.to_record(),
        "study": study.options.record(),
        "versions": dict(versions),
        "experts": [{"row": e.name, "source": e.source, "serves": list(e.serves), "heads": {d: e.head_kind(d) for d in e.heads},
                     "probed": findings.probed.get(e.name, [])} for e in findings.experts],
        "compatibility": diagnosis.report.record(),
        "skipped": diagnosis.refused,
        "merges": {merge_row(s): s.record() for s in diagnosis.runnable},
        "distillation": findings.distillation,
        "domains": {d: {"labels": study.label_names[d], "train-examples": len(v.train), "test-examples": len(v.test)} for d, v in study.data.items()},
        "scores": {n: {d: s.summary() for d, s in models[n].items()} for n in findings.order},
        "table": [{"model": r.name, "per-domain": r.per_domain, "mean": r.mean, "normalised": r.normalised} for r in rows],
        "against-ensemble": [{"claim": e.claim, "difference": e.difference, "verdict": e.verdict} for e in compared],
        "model-dirs": {n: str(study.out / n) for n in findings.produced},
        "wall-seconds": study.clock.seconds,
    }


def run_study(
    config: RunConfig, options: StudyOptions, rules: Sequence[RuleSetting], data: Mapping[str, DomainData], out: Path,
    versions: Mapping[str, str], announce: Callable[[str], None] = print,
) -> dict[str, object]:
    """Everything after the inputs passed their checks; raises NothingToProduce (before any scoring) when no
    single model can come out. `announce` shows the report and the skipped rules."""
    study = Study(config, options, data, Encodings(config, data, options.distill_texts), out, PhaseClock())
    torch.manual_seed(config.seed)
    with study.clock.phase("load experts"):
        experts, base = load_experts(study)
    with study.clock.phase("compatibility report"):
        diagnosis = diagnose(study, experts, base, rules)
    announce_diagnosis(diagnosis, announce)
    check_something_to_produce(options, diagnosis, base)

    models, probed = score_sources(study, experts, base)
    merges, merge_scores = weight_merges(study, diagnosis, experts)
    models.update(merge_scores)
    produced = list(merges)
    distillation: dict[str, object] = {}
    if options.distill:
        row, scores, distillation = distil_ensemble(study, experts, base, merges, models)
        models[row] = scores
        produced.append(row)

    findings = Findings(experts, base, diagnosis, models, produced, probed, distillation)
    with study.clock.phase("report"):
        rows, compared = write_report(study, findings)
    results = results_record(study, findings, rows, compared, versions)
    write_results(out / "results.json", results)
    return results
