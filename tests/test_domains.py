"""A run's domains are data: --domain NAME=SOURCE names any number of them, each with its own columns if needed."""

import csv
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fl.federation.rounds import CentralEvaluator, StrategyJob
from fl.federation.simulation import run_strategy
from fl.run import seeds
from fl.run.cli import build_config, run_options
from fl.run.config import ConfigError, RunConfig, parse_domains
from fl.studies.baselines import FEDAVG, fine_tune, one_shot
from strategies.rules import RULES, settings
from tests.conftest import FINANCE_WORDS, probed_start, tiny_run_config, write_domain_csv


def test_domains_keep_their_order_sources_and_own_columns() -> None:
    specs = parse_domains("bio=hpo; fin=data/fin.csv,text=body,group=doc ;legal=hf:lex@test")

    assert list(specs) == ["bio", "fin", "legal"]
    assert [s.source for s in specs.values()] == ["hpo", "data/fin.csv", "hf:lex@test"]
    config = RunConfig(domain_data="bio=hpo; fin=data/fin.csv,text=body,group=doc", label_column="y")
    assert config.domains == ["bio", "fin"] and config.num_clients == 2
    assert config.columns_of("fin") == ("body", "y", "doc") and config.columns_of("bio") == ("text", "y", "")


def test_without_domain_the_run_is_bio_and_legal_from_the_shorthand() -> None:
    assert RunConfig(bio_data="a.csv").domain_sources == {"bio": "a.csv", "legal": "licenses"}


@pytest.mark.parametrize(
    ("text", "needle"),
    [("a=x.csv", "1 domain given"), ("a=x.csv;a=y.csv", "given more than once"), ("a b=x.csv;c=y.csv", "name 'a b'"), ("a=;b=y.csv", "expected NAME=SOURCE")],
)
def test_bad_domain_lists_are_refused_in_a_run_config(text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        RunConfig.from_record({"domain-data": text})


def test_the_command_line_repeats_domain_and_joins_it_for_the_run_config() -> None:
    args = run_options("test").parse_args(["--domain", "a=x.csv", "--domain", "b=y.csv,label=cat"])

    config = build_config(args)

    assert config.domain_data == "a=x.csv; b=y.csv,label=cat"
    assert RunConfig.from_record(config.to_record()) == config  # what `flwr run .` and the checkpoints carry


@pytest.fixture(scope="module")
def three_domains(tiny_model_dir: Path, toy_csvs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory):
    bio, legal = toy_csvs
    folder = tmp_path_factory.mktemp("finance")
    finance = folder / "finance.csv"
    with finance.open("w", newline="") as f:  # its own column names, given with the domain
        rows = list(csv.reader(write_domain_csv(folder / "plain.csv", FINANCE_WORDS, 120, 2).open()))
        csv.writer(f).writerows([["body", "category"], *rows[1:]])
    config = replace(
        tiny_run_config(tiny_model_dir, toy_csvs),
        domain_data=f"bio={bio}; legal={legal}; finance={finance},text=body,label=category",
        bio_data=RunConfig().bio_data,
        legal_data=RunConfig().legal_data,
    ).validate()
    workbench, start, base_scores = probed_start(config, tiny_model_dir)
    return config, workbench, start, base_scores


def test_three_domains_federate_with_a_head_each_trained_by_its_own_clients(three_domains) -> None:
    config, workbench, start, base_scores = three_domains
    evaluator = CentralEvaluator(workbench.model, workbench.test_sets, "fedavg", initial_scores=base_scores)

    outcome = run_strategy(StrategyJob(replace(config, client_eval=False), FEDAVG, start, evaluator))

    assert all(set(scores) == {"bio", "legal", "finance"} for scores in evaluator.history.values())
    assert [sorted(c["client"].split("(")[1].rstrip(")") for c in h["clients"]) for h in outcome.client_history] == [
        ["bio-0", "finance-0", "legal-0"]
    ] * config.rounds
    for domain in config.domains:
        key = f"heads.{domain}.weight"
        assert (outcome.final_state[key] - start[key]).abs().max() > 0, f"the {domain} head was not trained"
    assert all(bool(torch.isfinite(v).all()) for v in outcome.final_state.values() if v.is_floating_point())


def test_three_experts_merge_once_with_every_rule_that_has_a_one_shot_row(three_domains) -> None:
    config, workbench, start, _ = three_domains
    experts = {d: fine_tune(workbench, start, [d], 2, seeds.expert_training(config.seed, i), d) for i, d in enumerate(config.domains)}
    one_shot_rules = [name for name, rule in RULES.items() if rule.one_shot]

    for name in one_shot_rules:
        (setting,) = settings([name], {f"{name}-batches": 1} if RULES[name].statistic else {})
        merged = one_shot(workbench, setting, start, experts, config.seed)

        assert set(merged) == set(start), name
        assert all(bool(torch.isfinite(v).all()) for v in merged.values() if v.is_floating_point()), name
        for domain in config.domains:  # only a domain's own expert sends its head: the head moves by that expert's training
            key = f"heads.{domain}.weight"
            assert (merged[key] - start[key]).abs().max() > 0, f"{name}: the {domain} head did not move"
            if name == "fedavg":  # a mean over the one client that sent it
                assert torch.allclose(merged[key], experts[domain][key], atol=1e-6)
        assert set(workbench.score(merged)) == {"bio", "legal", "finance"}
    assert {"fedavg", "ties", "regmean", "fisher", "aligned"} <= set(one_shot_rules)
