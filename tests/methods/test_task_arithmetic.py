"""Task arithmetic: hand-worked cases, MergeKit 0.1.5 parity, parameter checks, invariants."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from torch.testing import assert_close

from mergelab.errors import MergeError
from mergelab.methods import REGISTRY, PerModel
from mergelab.methods.task_arithmetic import TaskArithmeticParams, TaskArithmeticShared, task_arithmetic

FAST = settings(max_examples=25, deadline=None)


def run(x, base, weights, **shared):
    p = PerModel([TaskArithmeticParams(weight=w) for w in weights])
    return task_arithmetic(x, base, p, TaskArithmeticShared(**shared), None)


def mergekit_task_arithmetic(x, base, weights, **shared):
    pytest.importorskip("mergekit")
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    ids = [f"m{i}" for i in range(len(x))]
    group = TensorGroup.from_tensors([base, *x], ids=["base", *ids], base_index=0)
    params = {"weight": dict(zip(ids, weights)), **shared}
    return registry.get("task_arithmetic")([group], parameters=params)[0]


def randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_hand_worked():
    base = torch.tensor([1.0, 2.0, 3.0])
    x = base + torch.tensor([[1.0, 0.0, -1.0], [2.0, 2.0, 2.0]])
    # 0.5 * [1, 0, -1] + 0.25 * [2, 2, 2] = [1, 0.5, 0]; times lambda 2 = [2, 1, 0]
    assert_close(run(x, base, [0.5, 0.25], **{"lambda": 2.0}), torch.tensor([3.0, 3.0, 3.0]))
    # normalized: [1, 0.5, 0] / 0.75
    assert_close(run(x, base, [0.5, 0.25], normalize=True), base + torch.tensor([4 / 3, 2 / 3, 0.0]))


def test_second_formula_linear_in_models():
    # theta_b + sum w_i (theta_i - theta_b) = (1 - sum w) theta_b + sum w_i theta_i
    x, base, w = randn(3, 5, 7), randn(5, 7, seed=1), [0.3, -0.2, 0.9]
    expected = (1 - sum(w)) * base + sum(wi * xi for wi, xi in zip(w, x))
    assert_close(run(x, base, w), expected)


@pytest.mark.mergekit
@pytest.mark.parametrize("shape", [(), (6,), (4, 5), (2, 3, 4)])
@pytest.mark.parametrize("shared", [{}, {"lambda": 0.8}, {"normalize": True, "lambda": 1.5, "int8_mask": True}])
def test_matches_mergekit(shape, shared):
    x, base = randn(3, *shape, seed=2), randn(*shape, seed=3)
    weights = [0.7, 0.5, -0.3]
    assert_close(run(x, base, weights, **shared), mergekit_task_arithmetic(x, base, weights, **shared))


def test_zero_weight_sum_with_normalize_is_an_error():
    # MergeKit silently divides by 1 here; we say what is wrong.
    x, base = randn(2, 4), randn(4, seed=1)
    with pytest.raises(MergeError, match="sum to zero"):
        run(x, base, [0.5, -0.5], normalize=True)
    assert_close(run(x, base, [0.5, -0.5]), base + 0.5 * (x[0] - x[1]))


def test_parameters():
    assert TaskArithmeticShared(**{"lambda": 0.5}).lambda_ == 0.5
    assert TaskArithmeticShared().normalize is False
    assert TaskArithmeticParams(weight=1.0, density=1.0).density == 1.0
    with pytest.raises(ValidationError, match="density 0.5 would have no effect"):
        TaskArithmeticParams(weight=1.0, density=0.5)
    with pytest.raises(ValidationError):
        TaskArithmeticParams()  # weight is required, as in MergeKit
    with pytest.raises(ValidationError):
        TaskArithmeticShared(lamda=0.5)  # unknown keys are errors
    spec = REGISTRY["task_arithmetic"]
    assert spec.needs_base and not spec.randomized and spec.elementwise


def test_without_base_is_an_error():
    with pytest.raises(MergeError, match="base_model"):
        run(randn(2, 3), None, [1.0, 1.0])


@FAST
@given(seed=st.integers(0, 2**16), n=st.integers(1, 4), w=st.floats(0.1, 2.0))
def test_identical_models_normalized_give_the_model(seed, n, w):
    model, base = randn(3, 4, seed=seed), randn(3, 4, seed=seed + 1)
    out = run(model.expand(n, 3, 4).clone(), base, [w] * n, normalize=True)
    assert_close(out, model)


@FAST
@given(seed=st.integers(0, 2**16), weights=st.lists(st.floats(-2, 2), min_size=1, max_size=4),
       lam=st.floats(-2, 2), normalize=st.booleans())
def test_zero_task_vectors_are_a_no_op(seed, weights, lam, normalize):
    base = randn(5, seed=seed)
    if normalize and abs(sum(weights)) < 1e-3:
        normalize = False
    out = run(base.expand(len(weights), 5).clone(), base, weights, normalize=normalize, **{"lambda": lam})
    assert torch.equal(out, base)


@FAST
@given(seed=st.integers(0, 2**16), weights=st.lists(st.floats(0.1, 2), min_size=2, max_size=4),
       perm_seed=st.integers(0, 100))
def test_permuting_models_with_weights_changes_nothing(seed, weights, perm_seed):
    x, base = randn(len(weights), 6, seed=seed), randn(6, seed=seed + 1)
    perm = torch.randperm(len(weights), generator=torch.Generator().manual_seed(perm_seed))
    out = run(x, base, weights, normalize=True)
    assert_close(run(x[perm], base, [weights[i] for i in perm], normalize=True), out)


def test_inputs_are_not_mutated_and_rows_can_be_chunked():
    x, base = randn(3, 8, 5), randn(8, 5, seed=1)
    x0, b0 = x.clone(), base.clone()
    whole = run(x, base, [0.2, 0.5, 0.3], **{"lambda": 0.7})
    assert torch.equal(x, x0) and torch.equal(base, b0)
    # elementwise=True promises that row chunks merge independently.
    parts = [run(x[:, i:i + 3], base[i:i + 3], [0.2, 0.5, 0.3], **{"lambda": 0.7}) for i in (0, 3, 6)]
    assert torch.equal(torch.cat(parts), whole)
