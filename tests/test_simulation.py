"""A real Flower simulation (Ray backend) on a tiny model: it runs, records every round, and fails loudly."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fl.federation.rounds import CentralEvaluator, StrategyJob
from fl.federation.simulation import SimulationFailed, run_strategy
from fl.studies.baselines import FEDAVG
from strategies.rules import settings
from tests.conftest import probed_start, tiny_run_config


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir: Path, toy_csvs: tuple[Path, Path]):
    config = tiny_run_config(tiny_model_dir, toy_csvs, client_eval=True)
    workbench, start, base_scores = probed_start(config, tiny_model_dir)
    return config, workbench, start, base_scores


def test_two_clients_two_rounds_merge_and_score_every_domain_each_round(tiny_run) -> None:
    config, workbench, start, base_scores = tiny_run
    evaluator = CentralEvaluator(workbench.model, workbench.test_sets, "fedavg", initial_scores=base_scores)

    outcome = run_strategy(StrategyJob(config, FEDAVG, start, evaluator))

    assert sorted(evaluator.history) == [0, 1, 2]
    assert all(set(scores) == {"bio", "legal"} for scores in evaluator.history.values())
    assert [len(h["clients"]) for h in outcome.client_history] == [2, 2]
    moved = outcome.final_state["encoder.encoder.layer.0.output.dense.weight"] - start["encoder.encoder.layer.0.output.dense.weight"]
    assert moved.abs().max() > 0
    assert set(outcome.final_state) == set(start)


def test_a_client_that_raises_fails_the_run_with_its_error(tiny_run) -> None:
    config, workbench, start, base_scores = tiny_run
    broken = replace(config, bio_data=str(Path(config.bio_data).with_name("missing.csv")), client_eval=False)
    evaluator = CentralEvaluator(workbench.model, workbench.test_sets, "broken", initial_scores=base_scores)

    with pytest.raises(SimulationFailed, match="missing.csv"):
        run_strategy(StrategyJob(broken, FEDAVG, start, evaluator))


@pytest.mark.parametrize(("rule", "statistic"), [("fisher", "fisher"), ("regmean", "gram")])
def test_rules_with_client_statistics_run_two_clients_two_rounds(tiny_run, rule: str, statistic: str) -> None:
    config, workbench, start, base_scores = tiny_run
    (setting,) = settings([rule], {f"{rule}-batches": 1})
    evaluator = CentralEvaluator(workbench.model, workbench.test_sets, rule, initial_scores=base_scores)

    outcome = run_strategy(StrategyJob(replace(config, client_eval=False), setting, start, evaluator))

    assert sorted(evaluator.history) == [0, 1, 2]
    sent = [c["bytes-sent"] for h in outcome.client_history for c in h["clients"]]
    assert len(sent) == 4 and all(s[statistic] > 0 and s["arrays"] > 0 for s in sent)
    key = "encoder.encoder.layer.0.attention.self.query.weight"
    assert (outcome.final_state[key] - start[key]).abs().max() > 0
    assert all(bool(torch.isfinite(v).all()) for v in outcome.final_state.values() if v.is_floating_point())


@pytest.mark.parametrize("rule", ["iso-c", "adamerging"])
def test_a_subspace_rule_and_a_rule_learning_from_server_text_run_two_clients_two_rounds(tiny_run, rule: str) -> None:
    from fl.modeling.server_text import server_text

    config, workbench, start, base_scores = tiny_run
    (setting,) = settings([rule], {"adamerging-steps": 3} if rule == "adamerging" else {})
    text = server_text(workbench.model, workbench.train_sets, batches=1, batch_size=8) if setting.rule.server_text else None
    evaluator = CentralEvaluator(workbench.model, workbench.test_sets, rule, initial_scores=base_scores)

    outcome = run_strategy(StrategyJob(replace(config, client_eval=False), setting, start, evaluator, server_text=text))

    assert sorted(evaluator.history) == [0, 1, 2] and [len(h["clients"]) for h in outcome.client_history] == [2, 2]
    key = "encoder.encoder.layer.0.attention.self.query.weight"
    assert (outcome.final_state[key] - start[key]).abs().max() > 0
    if rule == "adamerging":  # each round learnt its coefficients and lowered the entropy on the server's text
        notes = [c["adamerging-entropy"] for h in outcome.client_history for c in h["clients"]]
        assert len(notes) == 4 and all(after < before for before, after in notes)
