"""The TIES kernel's into() with prepared magnitude orders (what search candidates run): the readable
reference's numbers, bit for bit, ties in magnitude included, at every size."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("numba")

from mergelab.methods import PerModel  # noqa: E402
from mergelab.methods.kernels import kernels_disabled  # noqa: E402
from mergelab.methods.kernels.ties_order import MagnitudeIndex  # noqa: E402
from mergelab.methods.sparsify import TaskVectorParams, TiesShared, ties  # noqa: E402

tk = pytest.importorskip("mergelab.methods.kernels.ties")


def _tied(n: int, models: int, dtype: torch.dtype, seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Task vectors taking a handful of values: most magnitudes are tied with thousands of others."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randint(-8, 9, (n,), generator=g).float() / 16).to(dtype)
    xs = [(base.float() + torch.randint(-3, 4, (n,), generator=g).float() / 32).to(dtype) for _ in range(models)]
    return xs, base


def _reference(xs, base, densities, weights, normalize, lam, dtype):
    """methods/sparsify.py's ties on float32 copies (kernels off), rounded as the engine rounds."""
    p = PerModel([TaskVectorParams(weight=w, density=d) for w, d in zip(weights, densities)])
    s = TiesShared(normalize=normalize, **{"lambda": lam})
    with kernels_disabled():
        merged = ties(torch.stack([x.float() for x in xs]), base.float(), p, s)
    return merged.to(dtype)


def _fast(xs, base, indexes, densities, weights, normalize, lam, dtype):
    """into() with the orders given through prepare's store (built once, outside, as a search keeps them)."""
    p = PerModel([TaskVectorParams(weight=w, density=d) for w, d in zip(weights, densities)])
    s = TiesShared(normalize=normalize, **{"lambda": lam})
    state = tk.prepare(xs, base, p, s, lambda i, build, nbytes: indexes[i])
    out = torch.full(base.shape, float("nan"), dtype=dtype)
    tk.into(xs, base, p, s, out, state)
    return out


def test_a_hand_worked_case():
    # tau_a = (0.5, -1, 0.25), tau_b = (-0.75, -0.5, 0.25); density 0.67 keeps floor(2.01) = 2 each:
    # a keeps 0.5, -1 (drops 0.25); b keeps -0.75, -0.5 (drops 0.25).
    # Weights 1, 1: sums (-0.25, -1.5, 0) -> signs (-, -, +); agreeing: (-0.75), (-1, -0.5), ();
    # normalised means: -0.75, -0.75, 0 -> base + (-0.75, -0.75, 0).
    base = torch.tensor([1.0, 2.0, 3.0])
    xs = [base + torch.tensor([0.5, -1.0, 0.25]), base + torch.tensor([-0.75, -0.5, 0.25])]
    idx = [MagnitudeIndex.build(x, base) for x in xs]
    out = _fast(xs, base, idx, [0.67, 0.67], [1.0, 1.0], True, 1.0, torch.float32)
    assert out.tolist() == [0.25, 1.25, 3.0]


@pytest.mark.parametrize("models", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_equals_the_reference_for_densities_in_sequence_with_many_ties(models, dtype):
    n = 10_000
    xs, base = _tied(n, models, dtype, seed=models)
    indexes = [MagnitudeIndex.build(x, base) for x in xs]  # built once, used by every candidate
    candidates = [  # (densities, weights, normalize, lambda): a search's successive candidates
        ([0.5, 0.3, 0.7], [1.0, 0.6, 0.8], True, 1.0),
        ([0.51, 0.3, 0.2], [1.0, 0.6, 0.8], True, 1.0),  # one density moved
        ([0.05, 1.0, 0.9], [0.7, -0.4, 1.2], False, 0.6),  # density 1 keeps all; a negative weight
        ([0.333, 0.999, 0.01], [1.0, 1.0, 1.0], True, 1.7),
        ([1.0, 1.0, 1.0], [0.5, 0.5, 0.5], False, 1.0),
        ([0.9, 0.45, 0.6], [2.0, 0.0, 1.0], True, 1.0),  # a zero weight: the divisor may be 0
    ]
    for densities, weights, normalize, lam in candidates:
        d, w = densities[:models], weights[:models]
        want = _reference(xs, base, d, w, normalize, lam, dtype)
        got = _fast(xs, base, indexes, d, w, normalize, lam, dtype)
        view = torch.int16 if dtype == torch.bfloat16 else torch.int32
        assert torch.equal(got.view(view), want.view(view)), (densities, weights, normalize, lam)


def test_bfloat16_inputs_into_a_float32_model():
    xs, base = _tied(5000, 2, torch.bfloat16, seed=9)
    idx = [MagnitudeIndex.build(x, base) for x in xs]
    got = _fast(xs, base, idx, [0.4, 0.6], [1.0, 0.5], True, 1.0, torch.float32)
    want = _reference(xs, base, [0.4, 0.6], [1.0, 0.5], True, 1.0, torch.float32)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_into_without_state_selects_as_run_does():
    xs, base = _tied(3000, 3, torch.bfloat16, seed=11)
    p = PerModel([TaskVectorParams(weight=w, density=d) for w, d in [(1.0, 0.3), (0.5, 1.0), (0.8, 0.6)]])
    s = TiesShared()
    out = torch.full(base.shape, float("nan"), dtype=torch.bfloat16)
    tk.into(xs, base, p, s, out)
    want = _reference(xs, base, [0.3, 1.0, 0.6], [1.0, 0.5, 0.8], True, 1.0, torch.bfloat16)
    assert torch.equal(out.view(torch.int16), want.view(torch.int16))
    assert torch.equal(tk.run(xs, base, p, s, None, torch.bfloat16).view(torch.int16), want.view(torch.int16))
