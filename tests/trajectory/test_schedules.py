"""Averaging schedules against hand-computed weights."""

import math

import pytest
import torch

from mergelab.trajectory.schedules import decay_shape, scheme_weights, wsm_weights


def test_sma_is_the_mean():
    assert scheme_weights("sma", 4) == [0.25] * 4
    assert scheme_weights("lawa", 2) == [0.5, 0.5]


def test_wma_grows_linearly():
    assert scheme_weights("wma", 3) == pytest.approx([1 / 6, 2 / 6, 3 / 6])


def test_ema_equals_the_recursion():
    alpha = 0.7
    thetas = [torch.tensor(float(v)) for v in (1.0, 5.0, -2.0, 3.0)]
    ema = thetas[0]
    for t in thetas[1:]:
        ema = alpha * ema + (1 - alpha) * t
    w = scheme_weights("ema", 4, alpha=alpha)
    assert sum(w) == pytest.approx(1.0)
    assert float(sum(c * t for c, t in zip(w, thetas))) == pytest.approx(float(ema))


def test_wsm_linear_decay_gives_uniform_weights():
    assert wsm_weights(decay_shape(5, "linear")) == pytest.approx([0.2] * 5)


def test_wsm_1_sqrt_matches_the_formula():
    k = 4
    w = [1 - math.sqrt(i / k) for i in range(k)]
    c = [w[j] - w[j + 1] for j in range(k - 1)] + [w[-1]]
    total = sum(c)
    assert scheme_weights("wsm", k, decay="1-sqrt") == pytest.approx([v / total for v in c])
    # Merge weights c reproduce the decay shape: w_i = sum_{j >= i} c_j (before normalisation).
    assert [sum(c[i:]) for i in range(k)] == pytest.approx(w)


def test_bad_input():
    with pytest.raises(ValueError, match="scheme"):
        scheme_weights("median", 3)
    with pytest.raises(ValueError, match="no checkpoints"):
        scheme_weights("sma", 0)
    with pytest.raises(ValueError, match="decay"):
        scheme_weights("wsm", 3, decay="step")
