"""AdaMerging: coefficients per client and layer learnt by minimising prediction entropy on unlabelled server text."""

from pathlib import Path

import pytest
import torch

from strategies.aggregation import UpdateError
from strategies.options import OptionError
from strategies.rules import check_server_text, settings
from strategies.update import ClientUpdate, MergeContext, ServerText
from tests.conftest import probed_start, tiny_run_config

FEATURES = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))


def toy_text() -> ServerText:
    """A linear 'model': one fixed batch of 16 feature vectors per domain through encoder.w, then the domain's head."""

    def logits(state, domain: str, index: int) -> torch.Tensor:
        return (FEATURES @ state["encoder.w"]) @ state[f"heads.{domain}.weight"].T

    return ServerText(logits, {"bio": 1, "legal": 1})


def toy_clients() -> tuple[dict[str, torch.Tensor], list[ClientUpdate]]:
    generator = torch.Generator().manual_seed(1)
    base = {"encoder.w": torch.randn(3, 4, generator=generator), "encoder.b": torch.zeros(4)}
    heads = {d: torch.randn(2, 4, generator=generator) for d in ("bio", "legal")}
    global_state = {**base, **{f"heads.{d}.weight": h for d, h in heads.items()}}
    clients = []
    for i, domain in enumerate(["bio", "legal"]):
        state = {"encoder.w": base["encoder.w"] + torch.randn(3, 4, generator=generator), "encoder.b": base["encoder.b"], f"heads.{domain}.weight": 2 * heads[domain]}
        clients.append(ClientUpdate(f"node {i} ({domain}-0)", f"{domain}-0", state, 10.0))
    return global_state, clients


def merge(global_state, clients, context: MergeContext, **values):
    (setting,) = settings(["adamerging"], {f"adamerging-{k}": v for k, v in values.items()})
    return setting.merge(global_state, clients, context)


def test_adamerging_lowers_the_entropy_on_a_fixed_batch_and_starts_from_the_average() -> None:
    global_state, clients = toy_clients()
    untrained = MergeContext(server_text=toy_text())
    trained = MergeContext(server_text=toy_text())

    average = merge(global_state, clients, untrained, steps=1, lr=1e-12)
    learnt = merge(global_state, clients, trained, steps=30, lr=0.05)

    mean = (clients[0].state["encoder.w"] + clients[1].state["encoder.w"]) / 2
    assert torch.allclose(average["encoder.w"], mean, atol=1e-5)  # init 0 = 1/N: the plain average
    before, after = trained.notes[clients[0].name]["adamerging-entropy"]
    assert after < before - 0.01
    assert not torch.allclose(learnt["encoder.w"], mean, atol=1e-3)
    assert torch.equal(learnt["encoder.b"], global_state["encoder.b"])  # no client changed it: not learnt, kept
    assert torch.equal(learnt["heads.bio.weight"], clients[0].state["heads.bio.weight"])  # a head: the mean of its senders


def test_adamerging_is_deterministic() -> None:
    global_state, clients = toy_clients()
    first = merge(global_state, clients, MergeContext(server_text=toy_text()), steps=5, lr=0.05)
    second = merge(global_state, clients, MergeContext(server_text=toy_text()), steps=5, lr=0.05)

    assert all(torch.equal(first[k], second[k]) for k in first)


def test_adamerging_without_server_text_is_refused_at_start_and_at_merge() -> None:
    global_state, clients = toy_clients()
    (setting,) = settings(["adamerging"], {})

    with pytest.raises(OptionError, match="^adamerging learns its merge from unlabelled text at the server, and with server-data = false"):
        check_server_text([setting], server_data=False)
    check_server_text([setting], server_data=True)
    with pytest.raises(UpdateError, match="adamerging: the server holds no unlabelled text"):
        setting.merge(global_state, clients, MergeContext())


def test_adamerging_learns_on_a_real_encoder_from_the_servers_training_texts(tiny_model_dir: Path, toy_csvs: tuple[Path, Path]) -> None:
    from fl.modeling.model import cpu_state
    from fl.modeling.server_text import server_text
    from fl.modeling.training import train

    config = tiny_run_config(tiny_model_dir, toy_csvs)
    workbench, start, _ = probed_start(config, tiny_model_dir)
    clients = []
    for i, domain in enumerate(["bio", "legal"]):
        workbench.model.load_state_dict(start)
        train(workbench.model, [(domain, workbench.train_sets[domain])], config.train_settings(), seed=i)
        state = {k: v for k, v in cpu_state(workbench.model).items() if not k.startswith("heads.") or k.startswith(f"heads.{domain}.")}
        clients.append(ClientUpdate(f"node {i} ({domain}-0)", f"{domain}-0", state, 10.0))
    text = server_text(workbench.model, workbench.train_sets, batches=1, batch_size=8)
    context = MergeContext(server_text=text)

    merged = merge(start, clients, context, steps=5, lr=0.05)

    before, after = context.notes[clients[0].name]["adamerging-entropy"]
    assert after < before
    assert set(merged) == set(start)
    assert all(bool(torch.isfinite(v).all()) for v in merged.values() if v.is_floating_point())
