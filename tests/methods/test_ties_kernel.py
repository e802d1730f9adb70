"""The compiled CPU TIES kernel gives the numbers of the torch path, bit for bit."""

import numpy as np
import pytest
import torch

from mergelab.methods import PerModel
from mergelab.methods import sparsify as sp
from mergelab.methods.sparsify import TaskVectorParams, TiesShared, keep_count

tk = pytest.importorskip("mergelab.methods.ties_kernel")


def _torch_ties(x, base, params, normalize=True, lam=1.0):
    weights = torch.tensor([q.weight for q in params])
    return sp._ties_blockwise(x.float(), base.float(), PerModel(params), weights, normalize=normalize, lam=lam)


def _kernel_ties(x, base, params, normalize=True, lam=1.0, out_dtype=torch.float32):
    keeps = [None if q.density >= 1 else keep_count(q.density, base.numel()) for q in params]
    return tk.ties_merge(x, base, keeps, [q.weight for q in params], normalize=normalize, lam=lam,
                         out_dtype=out_dtype)


def _quantised(shape, levels, gen):
    """Values on a coarse grid: task vectors full of ties, as differences of bfloat16 weights are."""
    return torch.randint(-levels, levels + 1, shape, generator=gen).float() / 8


@pytest.mark.parametrize("n_models", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_torch_path(n_models, dtype):
    g = torch.Generator().manual_seed(n_models)
    shape = (300, 700)  # several kernel blocks, so tie cut-offs fall inside a block
    base = torch.randn(shape, generator=g).to(dtype)
    x = torch.stack([(base.float() + 0.05 * torch.randn(shape, generator=g)).to(dtype) for _ in range(n_models)])
    params = [TaskVectorParams(weight=w, density=d) for w, d in ((0.5, 0.3), (0.8, 0.55), (0.7, 1.0))[:n_models]]
    for normalize in (True, False):
        want = _torch_ties(x, base, params, normalize)
        got = _kernel_ties(x, base, params, normalize)
        assert got.dtype == torch.float32 and got.shape == base.shape
        assert torch.equal(got, want)
        # rounded to bfloat16 inside the kernel exactly as torch rounds the float32 result
        rounded = _kernel_ties(x, base, params, normalize, out_dtype=torch.bfloat16)
        assert rounded.dtype == torch.bfloat16 and torch.equal(rounded, want.to(torch.bfloat16))
        assert torch.equal(_kernel_ties(list(x), base, params, normalize, out_dtype=torch.float16),
                           want.to(torch.float16))


@pytest.mark.parametrize("n_models", [2, 4])
def test_kernel_keeps_tied_entries_lowest_index_first(n_models):
    g = torch.Generator().manual_seed(5)
    shape = (257, 1031)  # ~265k entries: tie cut-offs land mid-block, in the middle of the tensor
    base = _quantised(shape, 3, g)
    x = torch.stack([base + _quantised(shape, 2, g) for _ in range(n_models)])
    params = [TaskVectorParams(weight=0.3 + 0.2 * i, density=0.2 + 0.15 * i) for i in range(n_models)]
    assert torch.equal(_kernel_ties(x, base, params), _torch_ties(x, base, params))
    # lambda scales through the same float32 operations; fused or not, equal to rounding
    torch.testing.assert_close(_kernel_ties(x, base, params, lam=0.7), _torch_ties(x, base, params, lam=0.7),
                               rtol=1e-6, atol=1e-6)


def test_hand_worked_ties_with_tied_magnitudes():
    # task vectors: a = [1, -1, 1, 1], b = [-2, 0, 0, 1]; density 0.5 keeps two of each.
    # a: all |1| tie, so the two lowest indices stay: [1, -1, 0, 0]; b: [-2, 0, 0, 1].
    # weights 1: sums [-1, -1, 0, 1] -> signs [-, -, +, +]; agreeing: [-2], [-1], [], [1].
    base = torch.zeros(4)
    x = torch.tensor([[1.0, -1.0, 1.0, 1.0], [-2.0, 0.0, 0.0, 1.0]])
    params = [TaskVectorParams(weight=1.0, density=0.5)] * 2
    got = _kernel_ties(x, base, params)
    assert got.tolist() == [-2.0, -1.0, 0.0, 1.0]


def test_threshold_is_the_exact_kth_largest_and_the_cutoff_keeps_exactly_k():
    g = torch.Generator().manual_seed(2)
    for values in (torch.randn(200_000, generator=g), _quantised((200_000,), 40, g)):
        base = torch.zeros_like(values)
        mags = values.abs()
        n = mags.numel()
        for k in (1, 999, n // 2, n - 1):
            (thr,), (cut,) = tk._thresholds((values.numpy(),), base.numpy(), [k])
            want = mags.kthvalue(n - k + 1).values
            assert thr == want.item()
            assert int((mags > want).sum()) + int((mags[:cut] == want).sum()) == k
            assert cut == n or mags[cut] == want  # the cut-off sits on a tied entry


def test_ties_method_uses_kernel_and_torch_path_alike(monkeypatch):
    g = torch.Generator().manual_seed(3)
    base = _quantised((64, 130), 3, g).to(torch.bfloat16)
    x = torch.stack([(base.float() + _quantised((64, 130), 2, g)).to(torch.bfloat16) for _ in range(2)])
    params = PerModel([TaskVectorParams(weight=0.6, density=0.4), TaskVectorParams(weight=0.4, density=0.7)])
    fast = sp.ties(x, base, params, TiesShared())
    monkeypatch.setenv("MERGELAB_NO_KERNELS", "1")
    slow = sp.ties(x, base, params, TiesShared())
    assert torch.equal(fast, slow)
    assert fast.dtype == torch.float32


def test_bfloat16_rounding_matches_torch_at_every_halfway_case():
    # every float32 bit pattern around bfloat16 halfway points (ties to even), plus
    # signed zeros, infinities and values that round up into the next exponent
    hi = torch.arange(0, 1 << 16, 97, dtype=torch.int64) << 16
    lows = torch.tensor([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=torch.int64)
    bits = (hi[:, None] | lows[None, :]).reshape(-1).to(torch.int32)
    values = bits.view(torch.float32)
    values = values[~torch.isnan(values)]  # NaN payloads differ between torch's own code paths
    values = torch.cat([values, torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3.3895314e38])])
    base = torch.zeros_like(values)
    def merged(dtype):
        return tk.ties_merge(values[None], base, [None], [1.0], normalize=False, lam=1.0, out_dtype=dtype)

    full = merged(torch.float32)
    assert torch.equal(full[values != 0], values[values != 0])  # one model, weight 1: itself (-0.0 -> 0.0)
    assert torch.equal(merged(torch.bfloat16).view(torch.int16), full.to(torch.bfloat16).view(torch.int16))


def test_kernel_refuses_what_it_cannot_run():
    x = torch.zeros(2, 8, dtype=torch.float16)
    assert not tk.available(x, torch.zeros(8, dtype=torch.float16))  # float16: the torch path runs
    assert not tk.available(torch.zeros(2, 8), torch.zeros(8, dtype=torch.float64))
    assert tk.available(torch.zeros(2, 8), torch.zeros(8))
    assert np.asarray(tk.as_array(torch.zeros(3, dtype=torch.bfloat16))).dtype == np.uint16
