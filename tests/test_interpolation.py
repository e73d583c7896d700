"""Tests for fl.studies.interpolation and sims/barrier.py: exact end points, zero aligned barrier for a permuted twin."""

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fl.federation.permuted_init import permuted_copy
from fl.modeling.evaluation import evaluate, pooled_features
from fl.modeling.folder import save_merged
from fl.modeling.probe import fit_probe
from fl.run.config import RunConfig
from fl.run.domains import load_domains
from fl.studies.baselines import Workbench, make_workbench
from fl.studies.interpolation import (
    above_chord,
    accuracy_drop,
    align,
    barriers,
    evaluate_path,
    interpolate,
    loss_barrier,
    path_points,
)
from sims import barrier

HEADS = 4
State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Setup:
    workbench: Workbench
    probed: State  # the tiny encoder with linear probes fitted per domain: low loss at the end points


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models score ten times faster on one thread than on two when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tiny_model_dir: Path, toy_csvs: tuple[Path, Path]) -> Setup:
    bio, legal = toy_csvs
    config = RunConfig(
        model=str(tiny_model_dir), bio_data=str(bio), legal_data=str(legal), train_size=60, test_size=24, max_length=16
    )
    workbench = make_workbench(config, str(tiny_model_dir), load_domains(config))
    for domain, data in workbench.train_sets.items():  # fl.studies.baselines.fit_base, with a cheaper fit
        head = fit_probe(pooled_features(workbench.model, data), data.labels, 3, max_iter=25)
        workbench.model.heads[domain].load_state_dict(head.state_dict())
    return Setup(workbench, {k: v.detach().clone() for k, v in workbench.model.state_dict().items()})


def _jittered(state: State, seed: int, scale: float = 0.05) -> State:
    generator = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=generator) for k, v in state.items()}


def test_interpolation_end_points_are_the_two_models_exactly(setup: Setup) -> None:
    a, b = setup.probed, _jittered(setup.probed, seed=1)
    model, test_sets = setup.workbench.model, setup.workbench.test_sets
    direct = []
    for state in (a, b):
        model.load_state_dict(state)
        direct.append({d: evaluate(model, d, data) for d, data in test_sets.items()})

    path = evaluate_path(model, test_sets, a, b, [0.0, 0.5, 1.0])

    assert all(torch.equal(interpolate(a, b, 0.0)[k], a[k]) and torch.equal(interpolate(a, b, 1.0)[k], b[k]) for k in a)
    for end, scores in zip((path[0], path[-1]), direct):
        for domain, score in scores.items():
            assert (end[domain].loss, end[domain].accuracy) == (score.loss, score.accuracy)
    assert path[0]["bio"].loss != path[-1]["bio"].loss  # the two ends really are different models


def test_permuted_twin_has_zero_aligned_barrier_and_a_positive_naive_one(setup: Setup) -> None:
    a = setup.probed
    b = permuted_copy(a, HEADS, seed=3)
    ts = path_points(5)

    alignment = align(a, b, HEADS, residual=True)
    naive = barriers(evaluate_path(setup.workbench.model, setup.workbench.test_sets, a, b, ts), ts)
    aligned = barriers(evaluate_path(setup.workbench.model, setup.workbench.test_sets, a, alignment.state, ts), ts)

    assert sum(alignment.moved.values()) > 0
    for domain in setup.workbench.test_sets:
        assert naive[domain]["loss-barrier"] > 0.05
        assert abs(aligned[domain]["loss-barrier"]) < 1e-5
        assert abs(aligned[domain]["accuracy-drop"]) < 1e-5


def test_barrier_arithmetic_on_a_hand_made_curve() -> None:
    ts = [0.0, 0.25, 0.5, 0.75, 1.0]
    losses = [1.0, 2.5, 1.5, 1.2, 2.0]
    accuracies = [0.9, 0.5, 0.6, 0.8, 0.7]

    assert loss_barrier(losses) == pytest.approx(2.5 - 1.5)
    assert accuracy_drop(accuracies) == pytest.approx(0.8 - 0.5)
    assert above_chord(losses, ts) == pytest.approx(2.5 - 1.25)  # chord at t=0.25 is 1.25
    assert above_chord([-x for x in accuracies], ts) == pytest.approx(0.85 - 0.5)  # chord at t=0.25 is 0.85
    assert loss_barrier([2.0, 1.5, 1.0]) == pytest.approx(0.5)  # a straight descent: half the end-point gap
    assert above_chord([2.0, 1.5, 1.0], [0.0, 0.5, 1.0]) == pytest.approx(0.0)


def test_interpolate_refuses_models_of_different_shapes(setup: Setup) -> None:
    a = setup.probed
    b = dict(a, **{"heads.bio.bias": torch.zeros(5)})

    with pytest.raises(ValueError, match="heads.bio.bias"):
        interpolate(a, b, 0.5)


def _run_folder(setup: Setup, folder: Path) -> Path:
    workbench = setup.workbench
    for name, state in [("bio-expert", setup.probed), ("legal-expert", permuted_copy(setup.probed, HEADS, seed=5))]:
        workbench.model.load_state_dict(state)
        save_merged(workbench.model, workbench.tokenizer, folder / name, workbench.label_names)
    (folder / "results.json").write_text(json.dumps({"config": workbench.config.to_record()}))
    return folder


def test_cli_writes_json_and_plot(setup: Setup, tmp_path: Path) -> None:
    run = _run_folder(setup, tmp_path / "run")

    code = barrier.main(["--run", str(run), "--points", "3", "--test-size", "12"])

    result = json.loads((run / "barrier.json").read_text())
    assert code == 0 and (run / "barrier.png").stat().st_size > 0
    assert result["points"] == [0.0, 0.5, 1.0] and result["test-examples"] == {"bio": 12, "legal": 12}
    assert result["matching"]["moved-units"] > 0
    assert len(result["curves"]["aligned"]["legal"]["accuracy"]) == 3
    for domain in ("bio", "legal"):
        assert result["barriers"]["naive"][domain]["loss-barrier"] > 0.05
        assert abs(result["barriers"]["aligned"][domain]["loss-barrier"]) < 1e-5


@pytest.mark.parametrize("missing", ["run", "model"])
def test_cli_missing_folder_fails_with_one_line_and_exit_2(
    setup: Setup, tmp_path: Path, missing: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "nowhere" if missing == "run" else _run_folder(setup, tmp_path / "run")

    code = barrier.main(["--run", str(run), "--b", "fedavg"])

    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert ("fedavg" if missing == "model" else "nowhere") in err
