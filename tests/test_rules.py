"""The registry of merge rules: declared options parsed and checked once, the docs' table of rules made from it,
and every client checked before a rule sees it."""

import re
from pathlib import Path

import pytest
import torch

from strategies.aggregation import UpdateError
from strategies.options import Option, OptionError
from strategies.rules import RULES, default_values, markdown_table, option_keys, parse_names, settings
from strategies.update import ClientUpdate, MergeContext, ServerText

RULES_PAGE = Path(__file__).resolve().parents[1] / "docs" / "merge-rules.md"  # where the table of rules lives


def test_every_rule_merges_two_clients_into_the_keys_they_sent() -> None:
    global_state = {"encoder.w": torch.zeros(2, 3), "encoder.b": torch.zeros(2), "heads.bio.weight": torch.zeros(1, 2)}
    statistics = {
        "fisher": lambda s: {k: torch.ones_like(v) for k, v in s.items()},
        "gram": lambda s: {"encoder.w": torch.eye(3)},
    }
    for setting in settings([n for n in RULES if n != "aligned"], {}):
        stat = setting.rule.statistic
        clients = [
            ClientUpdate(f"node {i}", f"c{i}", state, 1.0 + i, statistics[stat.name](state) if stat else {})
            for i, state in enumerate(
                [{"encoder.w": torch.ones(2, 3), "encoder.b": torch.ones(2), "heads.bio.weight": torch.ones(1, 2)},
                 {"encoder.w": torch.full((2, 3), 2.0), "encoder.b": torch.ones(2)}]
            )
        ]

        text = ServerText(lambda state, domain, index: state["encoder.w"] @ torch.ones(3, 2), {"bio": 1})  # adamerging's
        merged = setting.merge(global_state, clients, MergeContext(server_text=text if setting.rule.server_text else None))

        assert set(merged) == set(global_state), setting.name
        assert all(bool(torch.isfinite(v).all()) for v in merged.values()), setting.name


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("ties-density", 0, "ties-density 0: expected a number > 0 and <= 1"),
        ("ties-density", "abc", "ties-density abc: expected a number > 0 and <= 1"),
        ("dare-drop", 1.0, "dare-drop 1.0: expected a number >= 0 and < 1"),
        ("fedprox-mu", float("nan"), "fedprox-mu nan: expected a number >= 0"),
        ("task-arithmetic-lambda", float("inf"), "task-arithmetic-lambda inf"),
        ("fisher-batches", 2.5, "fisher-batches 2.5: expected an integer >= 1 and <= 10000"),
        ("aligned-residual", "maybe", "aligned-residual maybe: expected true or false"),
        ("ties-densty", 0.3, "unknown rule option 'ties-densty'"),
    ],
)
def test_a_bad_option_value_is_refused_in_one_line_naming_key_and_range(key: str, value: object, needle: str) -> None:
    with pytest.raises(OptionError) as error:
        settings(["fedavg"], {key: value})

    assert needle in str(error.value) and "\n" not in str(error.value)


def test_options_are_parsed_to_their_types_and_defaults_fill_the_rest() -> None:
    (ties, fisher, aligned) = settings(["ties", "fisher", "aligned"], {"ties-density": "0.5", "fisher-batches": "3", "aligned-residual": "false"})

    assert ties.values == {"density": 0.5, "lambda": 1.0}
    assert fisher.values == {"batches": 3, "floor": 1e-6} and isinstance(fisher.values["batches"], int)
    assert aligned.values == {"residual": False}
    assert fisher.client_config() == {"statistic-batches": 3, "statistic": "fisher"}
    assert settings(["fedprox"], {"fedprox-mu": 0.5})[0].client_config() == {"proximal-mu": 0.5}
    assert ties.record() == {"ties-density": 0.5, "ties-lambda": 1.0}


def test_an_option_whose_default_is_out_of_its_own_range_cannot_be_declared() -> None:
    with pytest.raises(OptionError, match="x 2.0"):
        Option("x", float, 2.0, "help", 0.0, 1.0)


def test_option_keys_are_unique_and_prefixed_by_their_rule() -> None:
    declared = [(rule.name, option.name) for rule in RULES.values() for option in rule.options]

    assert len(option_keys()) == len(declared)
    assert all(key.startswith(rule.name + "-") for key, (rule, _) in option_keys().items())
    assert default_values()["ties-density"] == 0.2


def test_rule_names_are_checked() -> None:
    assert parse_names(" fedavg , ties ") == ["fedavg", "ties"]
    with pytest.raises(OptionError, match="unknown tie"):
        parse_names("tie")


def test_a_rule_that_needs_statistics_refuses_a_client_without_them() -> None:
    (fisher,) = settings(["fisher"], {})
    client = ClientUpdate("node 4 (bio-0)", "bio-0", {"encoder.w": torch.ones(2)}, 1.0)

    with pytest.raises(UpdateError, match=r"^node 4 \(bio-0\): sent no 'fisher' statistics, which fisher needs$"):
        fisher.merge({"encoder.w": torch.zeros(2)}, [client], MergeContext())


@pytest.mark.parametrize("weight", [0.0, -3.0, float("nan")])
def test_a_client_weight_that_is_not_positive_is_refused(weight: float) -> None:
    (fedavg,) = settings(["fedavg"], {})

    with pytest.raises(UpdateError, match="node 1: averaging weight"):
        fedavg.merge({"w": torch.zeros(2)}, [ClientUpdate("node 1", "c1", {"w": torch.ones(2)}, weight)], MergeContext())


def test_the_docs_table_of_rules_is_the_registrys() -> None:
    assert markdown_table() in RULES_PAGE.read_text(), "docs/merge-rules.md's table of rules is stale: python -m strategies.rules"


def test_a_variant_names_its_options_inline_over_the_flags_and_the_defaults() -> None:
    entries = parse_names("ties,ties:density=0.1:lambda=2,dare:drop=0.5")

    plain, variant, dare = settings(entries, {"ties-density": 0.3, "dare-lambda": 1.5})

    assert (plain.name, dict(plain.values)) == ("ties", {"density": 0.3, "lambda": 1.0})
    assert (variant.name, dict(variant.values)) == ("ties:density=0.1:lambda=2", {"density": 0.1, "lambda": 2.0})
    assert (dare.name, dict(dare.values)) == ("dare:drop=0.5", {"drop": 0.5, "lambda": 1.5})


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("ties:dens=0.1", "'dens=0.1' is not OPTION=VALUE for an option of ties (density, lambda)"),
        ("fedavg:lambda=2", "an option of fedavg (none)"),
        ("ties:density=0", "ties:density=0: density 0: expected a number > 0 and <= 1"),
        ("ties:density=0.1,ties:density=0.1", "ties:density=0.1 listed more than once"),
    ],
)
def test_a_bad_variant_is_refused_naming_it(text: str, needle: str) -> None:
    with pytest.raises(OptionError, match=re.escape(needle)):
        settings(parse_names(text), {})
