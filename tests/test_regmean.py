"""RegMean against least squares, FedAvg with identity Grams, and the checks on the Grams a client sends."""

import pytest
import torch

from strategies.aggregation import UpdateError, weighted_mean
from strategies.regmean import check_grams, regmean
from strategies.update import ClientUpdate, MergeContext

OUT, IN = 3, 4


def layer_clients(inputs: list[torch.Tensor], weights: list[torch.Tensor], grams: list[torch.Tensor], examples: list[float]):
    return [
        ClientUpdate(f"node {i}", f"c{i}", {"enc.dense.weight": w, "enc.dense.bias": torch.full((OUT,), float(i))}, n, {"enc.dense.weight": g})
        for i, (x, w, g, n) in enumerate(zip(inputs, weights, grams, examples))
    ]


def test_regmean_is_the_least_squares_merge_of_the_clients_layer_outputs() -> None:
    generator = torch.Generator().manual_seed(0)
    rows = [20, 35, 12]
    inputs = [torch.randn(n, IN, generator=generator, dtype=torch.float64) for n in rows]
    weights = [torch.randn(OUT, IN, generator=generator, dtype=torch.float64) for _ in rows]
    grams = [(x.T @ x / len(x)).float() for x in inputs]  # what a client sends: the mean of x x^T
    global_state = {"enc.dense.weight": torch.zeros(OUT, IN), "enc.dense.bias": torch.zeros(OUT)}
    updates = layer_clients(inputs, [w.float() for w in weights], grams, [float(n) for n in rows])

    merged = regmean(global_state, updates, MergeContext(), alpha=1.0)

    # argmin_W sum_i ||X_i W^T - X_i W_i^T||^2, solved directly
    stacked = torch.cat(inputs)
    targets = torch.cat([x @ w.T for x, w in zip(inputs, weights)])
    expected = torch.linalg.lstsq(stacked, targets).solution.T
    assert torch.allclose(merged["enc.dense.weight"].double(), expected, atol=1e-5)
    assert torch.allclose(merged["enc.dense.bias"], torch.full((OUT,), (0 * 20 + 1 * 35 + 2 * 12) / 67))  # averaged


def test_identity_grams_give_fedavg() -> None:
    generator = torch.Generator().manual_seed(1)
    weights = [torch.randn(OUT, IN, generator=generator) for _ in range(3)]
    updates = layer_clients([None] * 3, weights, [torch.eye(IN)] * 3, [1.0, 2.0, 7.0])
    global_state = {"enc.dense.weight": torch.zeros(OUT, IN), "enc.dense.bias": torch.zeros(OUT)}

    merged = regmean(global_state, updates, MergeContext(), alpha=0.9)
    fedavg = weighted_mean((c.state, c.weight) for c in updates)

    assert all(torch.allclose(merged[k], fedavg[k], atol=1e-6) for k in fedavg)


def test_alpha_zero_keeps_only_the_diagonal_a_per_input_weighted_mean() -> None:
    w0, w1 = torch.ones(1, 2), torch.full((1, 2), 3.0)
    g0 = torch.tensor([[1.0, 5.0], [5.0, 3.0]])
    g1 = torch.tensor([[3.0, -2.0], [-2.0, 1.0]])
    updates = [ClientUpdate(f"node {i}", f"c{i}", {"d.weight": w}, 1.0, {"d.weight": g}) for i, (w, g) in enumerate([(w0, g0), (w1, g1)])]

    merged = regmean({"d.weight": torch.zeros(1, 2)}, updates, MergeContext(), alpha=0.0)

    # input 0: (1*1 + 3*3) / (1 + 3) = 2.5; input 1: (3*1 + 1*3) / (3 + 1) = 1.5
    assert torch.allclose(merged["d.weight"], torch.tensor([[2.5, 1.5]]))


@pytest.mark.parametrize(
    ("gram", "needle"),
    [
        (torch.tensor([[1.0, float("inf")], [float("inf"), 1.0]]), "non-finite"),
        (torch.tensor([[1.0, 2.0], [0.0, 1.0]]), "not symmetric"),
        (torch.tensor([[-1.0, 0.0], [0.0, 1.0]]), "negative diagonal"),
        (torch.eye(3), r"shape \(3, 3\), expected \(2, 2\)"),
    ],
)
def test_a_bad_gram_is_refused_naming_the_client(gram: torch.Tensor, needle: str) -> None:
    with pytest.raises(UpdateError, match=f"^node 5: Gram for 'd.weight' .*{needle}"):
        check_grams({"d.weight": torch.zeros(4, 2)}, {"d.weight": gram}, "node 5")


def test_an_input_feature_no_client_ever_sees_does_not_break_the_solve() -> None:
    gram = torch.tensor([[2.0, 0.0], [0.0, 0.0]])  # feature 1 is always zero: the summed Gram is singular
    updates = [ClientUpdate(f"node {i}", f"c{i}", {"d.weight": torch.full((1, 2), float(i))}, 1.0, {"d.weight": gram}) for i in range(2)]

    merged = regmean({"d.weight": torch.zeros(1, 2)}, updates, MergeContext(), alpha=1.0)

    assert torch.allclose(merged["d.weight"], torch.tensor([[0.5, 0.5]]), atol=1e-6)  # the unseen feature: the mean
