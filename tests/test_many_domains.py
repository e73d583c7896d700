"""The many-domains benchmark: its fixed subsets, its curve and choice of rules, the paired mean difference, and
``sims/many_domains.py --quick`` end to end on the six embedded domains (sizes cut further to keep the suite fast)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fl.modeling.evaluation import Score
from fl.studies.report import paired_mean_difference, table_row
from fl.studies.subset_merges import NO_MERGE, SubsetMerge, best_rules, curve, curve_markdown, domain_subsets

ROOT = Path(__file__).resolve().parents[1]
SIX = ["bio", "legal", "security", "scripture", "trade", "patents"]


def test_six_domains_give_three_windows_per_size_and_every_domain_a_place_in_each() -> None:
    subsets = domain_subsets(SIX)

    assert subsets[2] == [("bio", "legal"), ("security", "scripture"), ("trade", "patents")]
    assert subsets[3][2] == ("trade", "patents", "bio")  # windows wrap around
    assert subsets[6] == [tuple(SIX)]
    assert all(set().union(*subsets[k]) == set(SIX) for k in subsets)


def test_fewer_domains_clip_the_sizes_and_always_merge_all() -> None:
    assert domain_subsets(["a", "b", "c"]) == {2: [("a", "b"), ("c", "a"), ("b", "c")], 3: [("a", "b", "c")]}
    with pytest.raises(ValueError, match="subset size 1"):
        domain_subsets(SIX, [1])


def score(correct: list[int]) -> Score:
    values = np.array(correct, dtype=bool)
    return Score(float(values.mean()), 0.0, 0.0, values)


def merge(rule: str, domains: tuple[str, ...], correct: dict[str, list[int]], experts) -> SubsetMerge:
    scores = {d: score(correct[d]) for d in domains}
    return SubsetMerge(rule, domains, scores, table_row(rule, scores, experts, 0))


def test_the_curve_averages_each_size_and_the_choice_skips_rules_that_merge_to_the_average() -> None:
    experts = {d: score([1, 1, 1, 1]) for d in "xyz"}
    half, most, all_ = [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]
    grid = [
        merge(NO_MERGE, ("x", "y"), {"x": half, "y": half}, experts),
        merge(NO_MERGE, ("x", "y", "z"), {"x": half, "y": half, "z": half}, experts),
        merge("average", ("x", "y"), {"x": all_, "y": most}, experts),
        merge("average", ("x", "y", "z"), {"x": most, "y": most, "z": half}, experts),
        merge("same", ("x", "y", "z"), {"x": most, "y": most, "z": half}, experts),  # every prediction as the average's
        merge("ties", ("x", "y", "z"), {"x": all_, "y": most, "z": most}, experts),
        merge("fisher", ("x", "y", "z"), {"x": half, "y": half, "z": half}, experts),
    ]

    table = curve(grid)

    assert table["average"][2] == (0.875, 0.875, 0.875) and table["average"][3][0] == pytest.approx(2 / 3)
    assert best_rules(grid, table, 2) == ["ties", "fisher"]
    assert "| average | 87.5 | 66.7 | -20.8 |" in curve_markdown({"average": table["average"]}, {2: [("x", "y")], 3: [("x", "y", "z")]})


def test_a_paired_mean_difference_is_exact_for_a_uniform_shift_and_zero_against_itself() -> None:
    a = {"x": score([1, 1, 1, 1]), "y": score([1, 0, 1, 0])}
    b = {"x": score([1, 1, 0, 0]), "y": score([1, 0, 1, 0])}

    assert paired_mean_difference(a, a, ["x", "y"], 0) == (0.0, 0.0, 0.0)
    point, low, high = paired_mean_difference(a, b, ["x", "y"], 0)
    assert point == pytest.approx(0.25) and 0.0 <= low <= point <= high <= 0.5


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("many") / "run"
    argv = ["--quick", "--train-size", "40", "--test-size", "24", "--rules", "aligned,ties", "--federated", "0", "--sizes", "2", "--out", str(out)]
    done = subprocess.run([sys.executable, str(ROOT / "sims" / "many_domains.py"), *argv], capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_quick_run_merges_subsets_federates_and_writes_every_file(quick_run: Path) -> None:
    results = json.loads((quick_run / "results.json").read_text())

    assert results["subsets"] == {"2": [["bio", "legal"], ["security", "scripture"], ["trade", "patents"]], "6": [SIX]}
    assert set(results["curve"]) == {NO_MERGE, "average", "aligned", "ties"}
    assert results["federated"] == ["fedavg"]  # --federated 0: FedAvg only (the choice of rules: the test above)
    assert [r["round"] for r in results["strategies"]["fedavg"]["rounds"]] == [0, 1, 2]
    assert set(results["transfer"]) == {f"{d}-expert" for d in SIX} and all(set(row) == set(SIX) for row in results["transfer"].values())
    assert {e["claim"] for e in results["mean-differences"]} == {"fedavg - one-shot-average", "one-shot-aligned - one-shot-average", "one-shot-ties - one-shot-average"}
    markdown = (quick_run / "results.md").read_text()
    assert "| fedavg |" in markdown and "| one-shot-aligned |" in markdown and "## 3. Transfer" in markdown
    assert all((quick_run / name).stat().st_size > 1000 for name in ["subsets.png", "curves.png", "transfer.png"])
    assert (quick_run / "patents-expert" / "config.json").is_file() and (quick_run / "fedavg" / "config.json").is_file()
