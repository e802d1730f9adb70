"""The compiled weighted sum of linear merging against the torch path and a float64 reference."""

import pytest
import torch

from mergelab.methods import PerModel
from mergelab.methods.linear import LinearModel, LinearShared, linear

lk = pytest.importorskip("mergelab.methods.linear_kernel")


@pytest.mark.parametrize("n_models", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weighted_sum_matches_float64_reference(n_models, dtype):
    g = torch.Generator().manual_seed(n_models)
    rows = [torch.randn(257, 129, generator=g).to(dtype) for _ in range(n_models)]
    weights = [0.3, 0.5, 0.2][:n_models]
    want = sum(w * r.double() for w, r in zip(weights, rows))
    got = lk.weighted_sum(rows, weights)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    # rounded to bfloat16 in the kernel: torch's rounding of the float32 sum, up to one bf16 step
    # where float32 rounding of the sum itself sits on a halfway point
    rounded = lk.weighted_sum(rows, weights, torch.bfloat16)
    assert rounded.dtype == torch.bfloat16
    diff = (rounded.view(torch.int16).int() - got.to(torch.bfloat16).view(torch.int16).int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1e-3


def test_linear_method_uses_the_kernel_for_lists_and_agrees_with_torch(monkeypatch):
    g = torch.Generator().manual_seed(7)
    rows = [torch.randn(64, 33, generator=g).to(torch.bfloat16) for _ in range(2)]
    p = PerModel([LinearModel(weight=1.0), LinearModel(weight=3.0)])
    fast = linear(rows, None, p, LinearShared(), out_dtype=torch.bfloat16)
    monkeypatch.setenv("MERGELAB_NO_KERNELS", "1")
    slow = linear(rows, None, p, LinearShared(), out_dtype=torch.bfloat16)
    assert fast.dtype == slow.dtype == torch.bfloat16
    torch.testing.assert_close(fast.float(), slow.float(), rtol=2 ** -7, atol=0)
    assert lk.available(rows) and not lk.available([r.half() for r in rows])
    assert lk.weighted_sum([torch.zeros(0, 3)], [1.0]).shape == (0, 3)
