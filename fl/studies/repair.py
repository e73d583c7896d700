"""Repairing a merged model by distilling the experts' ensemble into it (``--repair distill:STEPS``).

A weight merge keeps part of what each expert knew; FedDF (Lin et al. 2020, arXiv 2006.07242) follows the
server's aggregation with distillation of the clients' ensemble on unlabelled data. Here, after the federated
rounds, each strategy's final model is the student and the experts are the teachers, each on its own domain,
on the domains' training texts without their labels (a server that holds the experts and unlabelled text).
Models are read from the folders the run saved, so a resumed run repairs the same models.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

from fl.modeling.distillation import DistillSettings, distill, kl_to_teacher, student_logits
from fl.modeling.evaluation import Scores, evaluate
from fl.modeling.folder import load_merged, save_merged
from fl.run.config import ConfigError
from fl.studies.baselines import Workbench

log = logging.getLogger(__name__)


def parse_repair(text: str) -> int:
    """'distill:STEPS' -> STEPS; '' (no repair) -> 0."""
    if not text:
        return 0
    kind, _, steps = text.partition(":")
    if kind != "distill" or not steps.isdigit() or int(steps) < 1:
        raise ConfigError(f"--repair {text}: expected distill:STEPS with STEPS a whole number >= 1")
    return int(steps)


def repaired_name(name: str) -> str:
    return f"{name}+distill"


def repair(workbench: Workbench, out: Path, names: Sequence[str], steps: int, seed: int) -> tuple[dict[str, Scores], dict[str, object]]:
    """Each saved model in `names` distilled from the domains' experts for `steps` steps, scored and saved as
    '<name>+distill'; their scores, and the KL to the teachers before and after for results.json."""
    domains = list(workbench.test_sets)
    transfer = workbench.train_sets  # the labels are never read
    teachers = {}
    for domain in domains:
        expert, _ = load_merged(out / f"{domain}-expert")
        teachers[domain] = student_logits(expert.to(workbench.config.device), domain, transfer[domain])
    settings = DistillSettings(steps, workbench.config.batch_size, schedule=workbench.config.lr_schedule,
                               freeze_word_embeddings=workbench.config.freeze_word_embeddings)
    scores: dict[str, Scores] = {}
    record: dict[str, object] = {"steps": steps, "temperature": settings.temperature, "teachers": [f"{d}-expert" for d in domains]}
    for name in names:
        student, _ = load_merged(out / name)
        student.to(workbench.config.device)
        before = kl_to_teacher(student, transfer, teachers, settings.temperature)
        tick = time.monotonic()

        def progress(step: int, domain: str, loss: float) -> None:
            if step == 0 or (step + 1) % 20 == 0 or step + 1 == steps:
                log.info("%s: distillation step %d/%d (%s) loss %.4f  %.0fs", name, step + 1, steps, domain, loss, time.monotonic() - tick)

        distill(student, transfer, teachers, settings, seed, progress)
        scores[repaired_name(name)] = {d: evaluate(student, d, workbench.test_sets[d]) for d in domains}
        record[name] = {"kl-before": before, "kl-after": kl_to_teacher(student, transfer, teachers, settings.temperature)}
        save_merged(student, workbench.tokenizer, out / repaired_name(name), workbench.label_names)
    return scores, record
