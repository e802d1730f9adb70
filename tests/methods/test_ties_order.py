"""A task vector's magnitude order (the TIES kernel's prepared state) against a full stable sort, for every k."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("numba")

from mergelab.methods.kernels.ties_order import MagnitudeIndex  # noqa: E402


def _reference(x: torch.Tensor, base: torch.Tensor, k: int) -> tuple[float, int]:
    """(k-th largest |x - base|, flat index of the first tied entry that does not fit) by a full stable sort."""
    mag = (x.float() - base.float()).abs().reshape(-1)
    # Descending magnitude, ascending index among equals: the order in which TIES keeps entries.
    order = torch.sort(mag, descending=True, stable=True).indices
    t = mag[order[k - 1]]
    cutoff = int(order[k]) if k < mag.numel() and mag[order[k]] == t else mag.numel()
    return float(t), cutoff


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [False, True])
def test_index_lookup_equals_a_full_sort_for_every_k(dtype, tied):
    g = torch.Generator().manual_seed(3 + tied)
    n = 3001
    if tied:  # few distinct magnitudes, many entries equal to each: the tie cut-off matters
        base = (torch.randint(-3, 4, (n,), generator=g).float() / 8).to(dtype)
        x = (base.float() + torch.randint(-2, 3, (n,), generator=g).float() / 8).to(dtype)
    else:
        base = torch.randn(n, generator=g).to(dtype)
        x = (base.float() + 0.05 * torch.randn(n, generator=g)).to(dtype)
    idx = MagnitudeIndex.build(x, base)
    mag = (x.float() - base.float()).abs()
    # the whole order is TIES's keeping order: magnitude descending, flat index ascending among equals
    assert idx.order.tolist() == torch.sort(mag, descending=True, stable=True).indices.tolist()
    for k in [1, 2, 7, 100, 1500, 2999, 3000, *range(1, n, 97)]:
        t, cutoff = idx.select(k, x, base)
        want_t, want_cut = _reference(x, base, k)
        assert float(t) == want_t and cutoff == want_cut, k
        # exactly k entries kept by the rule "above T, or equal to T below the cut-off"
        kept = (mag > t) | ((mag == t) & (torch.arange(n) < cutoff))
        assert int(kept.sum()) == k
    with pytest.raises(ValueError):
        idx.select(n, x, base)


def test_index_of_a_multidimensional_tensor_uses_flat_indices():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(37, 53, generator=g)
    x = base + torch.randn(37, 53, generator=g)
    idx = MagnitudeIndex.build(x, base)
    for k in (1, 400, 1960):
        assert (float(idx.select(k, x, base)[0]), idx.select(k, x, base)[1]) == _reference(x, base, k)
    assert idx.nbytes == MagnitudeIndex.nbytes_for(37 * 53)


def test_order_of_a_bucket_bigger_than_the_counting_sort_bound():
    # 200,000 magnitudes in [1, 1 + 300 * 2^-23): one bucket of the top 16 bits, 300 low values, all tied
    # with hundreds of others: the big-bucket path (a counting sort) must keep indices ascending among equals.
    g = torch.Generator().manual_seed(5)
    n = 200_000
    base = torch.randn(n, generator=g) * 1e-3
    mag = 1 + torch.randint(0, 300, (n,), generator=g).double() * 2.0**-23
    sign = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    x = ((base.double() + sign * mag)).float()
    idx = MagnitudeIndex.build(x, base)
    want = torch.sort((x - base).abs(), descending=True, stable=True).indices
    assert torch.equal(torch.from_numpy(idx.order).long(), want)
    for k in (1, 5000, 123_457, n - 1):
        assert (float(idx.select(k, x, base)[0]), idx.select(k, x, base)[1]) == _reference(x, base, k)
