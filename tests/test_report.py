"""Report arithmetic: intervals bracket the point estimate, paired differences, effects, files."""

from pathlib import Path

import numpy as np

from fl.modeling.evaluation import Score, macro_f1
from fl.studies.report import effects, label_positions, markdown, paired_difference, plot_curves, table_row


def score(correct: list[bool]) -> Score:
    arr = np.array(correct)
    return Score(float(arr.mean()), 0.0, 0.0, arr)


def test_table_row_normalises_by_each_domains_expert() -> None:
    model = {"bio": score([1, 1, 0, 0]), "legal": score([1, 1, 1, 0])}
    experts = {"bio": score([1, 1, 1, 1]), "legal": score([1, 1, 1, 0])}

    row = table_row("m", model, experts, seed=0)

    assert row.normalised[0] == (0.5 / 1.0 + 0.75 / 0.75) / 2
    assert row.mean[0] == (0.5 + 0.75) / 2
    assert row.per_domain["bio"][1] <= 0.5 <= row.per_domain["bio"][2]


def test_paired_difference_of_identical_models_is_exactly_zero() -> None:
    a = score([1, 0, 1, 1, 0])

    assert paired_difference(a, a, seed=0) == (0.0, 0.0, 0.0)


def test_effect_holds_only_when_the_interval_excludes_zero() -> None:
    good = score([True] * 200)
    bad = score([False] * 200)
    models = {
        "base": {"bio": bad, "legal": bad},
        "bio-expert": {"bio": good, "legal": bad},
        "legal-expert": {"bio": bad, "legal": bad},
    }

    found = {e.claim: e.holds for e in effects(models, ["bio", "legal"], [], seed=0)}

    assert found["bio-expert beats base on bio"] is True
    assert found["legal-expert beats base on legal"] is False


def test_macro_f1_matches_a_hand_computed_value() -> None:
    labels = np.array([0, 0, 1, 1])
    predictions = np.array([0, 1, 1, 1])

    # class 0: tp 1, fp 0, fn 1 -> 2/3; class 1: tp 2, fp 1, fn 0 -> 4/5
    assert abs(macro_f1(labels, predictions) - (2 / 3 + 4 / 5) / 2) < 1e-12


def test_markdown_and_plot_are_written(tmp_path: Path) -> None:
    s = {"bio": score([1, 0]), "legal": score([1, 1])}
    rows = [table_row("base", s, s, 0)]

    text = markdown(rows, [], ["bio", "legal"], "# title")
    plot_curves(tmp_path / "curves.png", {"fedavg": {0: s, 1: s}}, {"base": s}, ["bio", "legal"])

    assert "| base |" in text and "bio accuracy" in text
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_markdown_states_each_domains_sizes_and_the_precision_they_allow() -> None:
    s = {"bio": score([1, 0]), "legal": score([1, 1])}
    rows = [table_row("base", s, s, 0)]

    text = markdown(rows, [], ["bio", "legal"], "# title", sizes={"bio": (2000, 1000), "legal": (500, 100)})

    assert "bio 2000 train / 1000 test, legal 500 train / 100 test" in text
    assert "+-3.1 points on bio, +-9.8 points on legal" in text  # 1.96 sqrt(0.25 / n) in points
    assert "Examples per domain" not in markdown(rows, [], ["bio", "legal"], "# title")


def test_baseline_labels_keep_their_lines_height_unless_they_would_overlap() -> None:
    assert label_positions([0.9, 0.5, 0.7], 0.05) == [0.9, 0.5, 0.7]

    crowded = label_positions([0.80, 0.81, 0.50], 0.05)

    assert crowded[2] == 0.50
    assert crowded[1] - crowded[0] >= 0.05 - 1e-12 and crowded[0] <= 0.80 <= crowded[1]
