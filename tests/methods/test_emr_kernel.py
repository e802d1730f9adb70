"""emr's compiled pass (methods/kernels/emr.py) against the torch reference: the model's bits, the masks'
bits, the rescalers' means within float32 rounding; through run_method's side path as the engine calls it."""

from __future__ import annotations

import pytest
import torch

from mergelab.methods import PerModel, get_method, run_method
from mergelab.methods.kernels import kernels_disabled

pytest.importorskip("numba")


def _inputs(n_models: int, shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    xs = [base + 0.01 * torch.randn(shape, generator=gen) for _ in range(n_models)]
    if base.numel() > 4:  # entries where some task vectors are exactly 0 and where they cancel
        flat = [x.view(-1) for x in xs]
        flat[0][:3] = base.view(-1)[:3]
        if n_models > 1:
            flat[1][3] = 2 * base.view(-1)[3] - flat[0][3]
    return [x.to(dtype) for x in xs], base.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_models, shape", [(1, (70,)), (2, (131, 77)), (3, (300, 257)), (4, ()), (3, (5,))])
def test_kernel_gives_the_references_model_masks_and_means(n_models, shape, dtype):
    spec = get_method("emr")
    xs, base = _inputs(n_models, shape, dtype)
    p, s = PerModel([spec.model_params() for _ in xs]), spec.shared_params()
    assert spec.kernel.supports(xs, base, p, s)
    fast_side: dict = {}
    fast = run_method(spec, xs, base, p, s, side=fast_side)
    ref_side: dict = {}
    with kernels_disabled():
        ref = run_method(spec, xs, base, p, s, side=ref_side)
    assert fast.dtype == ref.dtype == dtype and torch.equal(fast, ref)
    assert torch.equal(fast_side["masks"], ref_side["masks"])
    for key in ("abs_task", "abs_uni"):
        assert fast_side[key].shape == ref_side[key].shape
        torch.testing.assert_close(fast_side[key], ref_side[key], rtol=2e-6, atol=0)


def test_without_side_the_kernel_still_gives_the_unified_model():
    spec = get_method("emr")
    xs, base = _inputs(3, (64, 33), torch.float32, seed=3)
    p, s = PerModel([spec.model_params() for _ in xs]), spec.shared_params()
    with kernels_disabled():
        ref = run_method(spec, xs, base, p, s)
    assert torch.equal(run_method(spec, xs, base, p, s), ref)
