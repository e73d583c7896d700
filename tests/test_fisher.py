"""Fisher-weighted averaging and the checks on the Fisher a client sends."""

import pytest
import torch

from strategies.aggregation import UpdateError, weighted_mean
from strategies.fisher import check_fisher, fisher_average
from strategies.update import ClientUpdate, MergeContext

GLOBAL = {"encoder.w": torch.zeros(3), "encoder.frozen": torch.zeros(2)}


def client(i: int, w: list[float], fisher: list[float] | None, weight: float) -> ClientUpdate:
    state = {"encoder.w": torch.tensor(w), "encoder.frozen": torch.full((2,), float(i))}
    stats = {"encoder.w": torch.tensor(fisher)} if fisher is not None else {}
    return ClientUpdate(f"node {i}", f"c{i}", state, weight, stats)


def test_fisher_weighted_mean_by_hand() -> None:
    a = client(0, [1.0, 2.0, 3.0], [1.0, 0.0, 4.0], 1.0)
    b = client(1, [5.0, 6.0, 7.0], [3.0, 0.0, 4.0], 3.0)

    merged = fisher_average(GLOBAL, [a, b], MergeContext(), floor=0.5)

    # coordinate 0: (1*1*1 + 3*3*5) / (1*1 + 3*3) = 46/10; coordinate 1: both floored to 0.5 -> (0.5*2 + 1.5*6) / 2 = 5
    # coordinate 2: (4*3 + 12*7) / 16 = 6; frozen weights have no Fisher -> FedAvg (0*1 + 1*3) / 4 = 0.75
    assert torch.allclose(merged["encoder.w"], torch.tensor([4.6, 5.0, 6.0]))
    assert torch.allclose(merged["encoder.frozen"], torch.full((2,), 0.75))


def test_equal_fishers_give_fedavg() -> None:
    a = client(0, [1.0, 2.0, 3.0], [0.3, 2.0, 7.0], 2.0)
    b = client(1, [5.0, -6.0, 0.5], [0.3, 2.0, 7.0], 5.0)

    merged = fisher_average(GLOBAL, [a, b], MergeContext(), floor=1e-6)
    fedavg = weighted_mean((c.state, c.weight) for c in [a, b])

    assert all(torch.allclose(merged[k], fedavg[k]) for k in fedavg)


def test_a_dominant_fisher_returns_that_clients_value() -> None:
    a = client(0, [1.0, 2.0, 3.0], [1e6, 1e6, 1e6], 1.0)
    b = client(1, [5.0, -6.0, 0.5], [1e-3, 1e-3, 1e-3], 10.0)

    merged = fisher_average(GLOBAL, [a, b], MergeContext(), floor=1e-6)

    assert torch.allclose(merged["encoder.w"], torch.tensor([1.0, 2.0, 3.0]), rtol=1e-6, atol=1e-6)


def test_a_key_with_a_fisher_from_some_clients_only_is_refused() -> None:
    with pytest.raises(UpdateError, match="node 1: has no Fisher for 'encoder.w'"):
        fisher_average(GLOBAL, [client(0, [1.0, 2.0, 3.0], [1.0, 1.0, 1.0], 1.0), client(1, [1.0, 2.0, 3.0], None, 1.0)], MergeContext(), floor=1e-6)


@pytest.mark.parametrize(
    ("fisher", "needle"),
    [
        ({"encoder.w": torch.tensor([1.0, float("nan"), 0.0])}, "non-finite"),
        ({"encoder.w": torch.tensor([1.0, -0.5, 0.0])}, "negative values"),
        ({"encoder.w": torch.ones(4)}, r"shape \(4,\), expected \(3,\)"),
        ({"encoder.other": torch.ones(3)}, "not a float weight it sent"),
    ],
)
def test_a_bad_fisher_is_refused_naming_the_client(fisher: dict[str, torch.Tensor], needle: str) -> None:
    with pytest.raises(UpdateError, match=f"^node 3: Fisher for .*{needle}"):
        check_fisher({"encoder.w": torch.zeros(3)}, fisher, "node 3")
