"""Gram matrices from forward hooks against sums of outer products; RegMean end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from mergelab.errors import StatsError
from mergelab.methods import REGISTRY, PerModel
from mergelab.methods import preconditioned as pc
from mergelab.stats import gram_matrices


def outer_sum(rows: torch.Tensor) -> torch.Tensor:
    """sum_r x_r x_r^T, one row at a time: the second formula for X^T X."""
    total = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64)
    for r in rows.double():
        total += torch.outer(r, r)
    return total


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = torch.nn.Linear(3, 5), torch.nn.Linear(5, 2)
        self.spare = torch.nn.Linear(7, 7)  # never called

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_every_linear_layer_of_an_mlp():
    model = MLP()
    x = torch.randn(11, 3, generator=torch.Generator().manual_seed(1))
    grams = gram_matrices(model, [x[:4], (x[4:], None)])
    hidden = torch.relu(model.fc1(x)).detach()
    assert_close(grams["fc1.weight"].double(), outer_sum(x) / 11, rtol=1e-5, atol=1e-6)
    assert_close(grams["fc2.weight"].double(), outer_sum(hidden) / 11, rtol=1e-5, atol=1e-6)
    assert grams.count == 11 and grams.kind == "gram"
    assert grams.extra["rows"] == {"fc1.weight": 11, "fc2.weight": 11}
    assert grams.extra["unused"] == ["spare.weight"] and "spare.weight" not in grams


class Tagger(torch.nn.Module):
    """Token ids (batch, seq) -> a linear layer on embeddings; takes an attention mask like HF models."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.embed = torch.nn.Embedding(9, 4)
        self.proj = torch.nn.Linear(4, 3)

    def forward(self, input_ids, attention_mask=None):
        return self.proj(self.embed(input_ids))


def test_tokens_are_rows_and_padding_is_left_out():
    model = Tagger()
    ids = torch.randint(0, 9, (2, 5), generator=torch.Generator().manual_seed(3))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    grams = gram_matrices(model, [{"input_ids": ids, "attention_mask": mask, "labels": ids}])
    emb = model.embed(ids).detach()
    real = torch.cat([emb[0], emb[1, :2]])  # 7 real tokens
    assert grams.extra["rows"]["proj.weight"] == 7 and grams.count == 2
    assert_close(grams["proj.weight"].double(), outer_sum(real) / 7, rtol=1e-5, atol=1e-6)
    # A custom forward sees the raw batch.
    grams = gram_matrices(model, [ids], forward=lambda m, b: m(b))
    assert_close(grams["proj.weight"].double(), outer_sum(emb.reshape(-1, 4)) / 10, rtol=1e-5, atol=1e-6)


def test_transformers_conv1d_is_recorded_as_transposed():
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    torch.manual_seed(4)
    layer = conv1d(6, 4)  # nf=6 outputs, nx=4 inputs: weight (4, 6)
    x = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(5))
    grams = gram_matrices(layer, [x])
    assert grams.extra["transposed"] == ["weight"]
    assert_close(grams["weight"].double(), outer_sum(x.reshape(-1, 4)) / 6, rtol=1e-5, atol=1e-6)


def test_regmean_with_measured_grams_is_least_squares_on_the_union():
    # Two "models" fitted by least squares on two datasets; merging them with their measured Gram
    # matrices, weighted by their row counts, gives the least-squares fit of both datasets together.
    rng = np.random.default_rng(6)
    xs = [rng.normal(size=(n, 4)) + shift for n, shift in ((40, 0.0), (25, 1.5))]
    ys = [x @ rng.normal(size=(4, 2)) for x in xs]
    fitted = [np.linalg.lstsq(x, y, rcond=None)[0].T for x, y in zip(xs, ys)]
    union = np.linalg.lstsq(np.vstack(xs), np.vstack(ys), rcond=None)[0].T
    grams, rows = [], []
    for x in xs:
        layer = torch.nn.Linear(4, 2, bias=False)
        g = gram_matrices(layer, [torch.tensor(x, dtype=torch.float32)])
        grams.append(g["weight"])
        rows.append(g.extra["rows"]["weight"])
    spec = REGISTRY["regmean"]
    merged = spec.fn(torch.tensor(np.stack(fitted), dtype=torch.float32), None,
                     PerModel([pc.MetricWeight(weight=r) for r in rows]), spec.shared_params(alpha=1.0), None,
                     stats=torch.stack(grams))
    assert_close(merged, torch.tensor(union, dtype=torch.float32), rtol=1e-4, atol=1e-4)


def test_errors():
    with pytest.raises(StatsError, match="no nn.Linear"):
        gram_matrices(torch.nn.Embedding(3, 2), [torch.tensor([0, 1])])
    with pytest.raises(StatsError, match="cannot read a batch"):
        gram_matrices(torch.nn.Linear(2, 2), [object()])
