"""The TIES-family kernels (methods/kernels/ties.py, thinned.py) on tensors big enough for their sampled selection.

The threshold selection (_thresholds) is checked against torch.kthvalue and a count of ties, on data
that takes each of its routes: a candidate hit (masses of tied values), a second counting pass, a
gather (continuous values), and a sample that misleads on purpose. The merges are checked bit for bit
against the readable references on tensors above the kernel's size floor.
"""

import numpy as np
import pytest
import torch

from mergelab.methods import PerModel, get_method, run_method
from mergelab.methods.kernels import kernels_disabled

tk = pytest.importorskip("mergelab.methods.kernels.ties")
ts = pytest.importorskip("mergelab.methods.kernels.ties_select")  # the threshold selection

N = 300_000  # above 4 * _SAMPLE: the selection samples


def _check_threshold(values: torch.Tensor, base: torch.Tensor, k: int, thr: float, cut: int) -> None:
    """thr is the exact k-th largest |values - base| and the cut-off keeps exactly k entries, ties by index."""
    mags = (values.float() - base.float()).abs()
    n = mags.numel()
    want = mags.kthvalue(n - k + 1).values
    assert thr == want.item()
    assert int((mags > want).sum()) + int((mags[:cut] == want).sum()) == k
    assert cut == n or mags[cut] == want


def _routes(monkeypatch):
    """Count the calls of the selection's later passes."""
    calls = {"count": 0, "gather": 0}
    count, gather = ts._count, ts._gather_between

    def counting(*a, **kw):
        calls["count"] += 1
        return count(*a, **kw)

    def gathering(*a, **kw):
        calls["gather"] += 1
        return gather(*a, **kw)

    monkeypatch.setattr(ts, "_count", counting)
    monkeypatch.setattr(ts, "_gather_between", gathering)
    return calls


def _tied_bf16(gen, n=N):
    """bfloat16 base and fine-tune as in the bench: differences in masses of tied magnitudes."""
    base = (0.02 * torch.randn(n, generator=gen)).bfloat16()
    ft = (base.float() + 1e-3 * torch.randn(n, generator=gen)).bfloat16()
    return base, ft


@pytest.mark.parametrize("k", [1, 17, N // 10, N // 2, N - 1])
def test_thresholds_exact_on_bfloat16_task_vectors(k):
    g = torch.Generator().manual_seed(k)
    base, ft = _tied_bf16(g)
    other = (base.float() + 2e-3 * torch.randn(N, generator=g)).bfloat16()
    thr, cut = ts._thresholds((tk.as_array(ft), tk.as_array(other)), tk.as_array(base), [k, k])
    _check_threshold(ft, base, k, thr[0], cut[0])
    _check_threshold(other, base, k, thr[1], cut[1])


def test_thresholds_exact_on_continuous_values_through_the_gather(monkeypatch):
    calls = _routes(monkeypatch)
    g = torch.Generator().manual_seed(1)
    values = torch.randn(N, generator=g)
    base = torch.zeros(N)
    for k in (5, N // 3, N // 2):
        (thr,), (cut,) = ts._thresholds((values.numpy(),), base.numpy(), [k])
        _check_threshold(values, base, k, thr, cut)
    assert calls["gather"] >= 1  # continuous values: the k-th largest is rarely a sampled value


def test_thresholds_exact_on_tied_masses_without_a_gather(monkeypatch):
    calls = _routes(monkeypatch)
    g = torch.Generator().manual_seed(2)
    values = torch.randint(-40, 41, (N,), generator=g).float() / 8  # 41 magnitudes, about 2.4% each
    base = torch.zeros(N)
    for k in (N // 7, N // 2, N - 5):
        (thr,), (cut,) = ts._thresholds((values.numpy(),), base.numpy(), [k])
        _check_threshold(values, base, k, thr, cut)
        assert cut < N  # the k-th largest is inside a mass of ties: the cut-off is placed
    assert calls["gather"] == 0


def test_thresholds_exact_when_the_sample_misleads(monkeypatch):
    # Every sampled entry (multiples of the stride) is huge and the rest small and continuous: the
    # candidates all miss, the counts still name the right range and the gather finds the value.
    calls = _routes(monkeypatch)
    g = torch.Generator().manual_seed(3)
    values = 1e-3 * torch.rand(N, generator=g)
    step = (N // ts._SAMPLE) | 1
    values[::step] = 100 + torch.rand(values[::step].shape, generator=g)
    base = torch.zeros(N)
    for k in (N // 2, N // 4, step):
        (thr,), (cut,) = ts._thresholds((values.numpy(),), base.numpy(), [k])
        _check_threshold(values, base, k, thr, cut)
    assert calls["gather"] >= 2


def test_thresholds_second_counting_pass_when_the_first_candidates_miss(monkeypatch):
    # No candidates in the first pass (only the guards): the range between the guards holds several
    # tied values, and the second pass, on the tied values the sample saw there, finds the k-th largest.
    calls = _routes(monkeypatch)
    monkeypatch.setattr(ts, "_NEAR", 0)
    g = torch.Generator().manual_seed(6)
    values = torch.randint(-40, 41, (N,), generator=g).float() / 8
    base = torch.zeros(N)
    for k in (N // 3, N // 2):
        (thr,), (cut,) = ts._thresholds((values.numpy(),), base.numpy(), [k])
        _check_threshold(values, base, k, thr, cut)
    assert calls["count"] == 4 and calls["gather"] == 0


def test_thresholds_on_several_rows_of_one_model_and_small_tensors():
    g = torch.Generator().manual_seed(4)
    base, ft = _tied_bf16(g)
    a = tk.as_array(ft)
    thr, cut = ts._thresholds((a, a), tk.as_array(base), [N // 2, N // 100])  # as breadcrumbs asks
    _check_threshold(ft, base, N // 2, thr[0], cut[0])
    _check_threshold(ft, base, N // 100, thr[1], cut[1])
    small = torch.tensor([3.0, -1.0, 3.0, 0.5, -3.0])
    for k in range(1, 5):
        (t,), (c,) = ts._thresholds((small.numpy(),), np.zeros(5, dtype=np.float32), [k])
        _check_threshold(small, torch.zeros(5), k, t, c)


def _params(name, n_models):
    spec = get_method(name)
    extra = {"gamma": 0.01} if name.startswith("breadcrumbs") else {}
    weights, densities = [0.5, 0.7, 1.1], [0.5, 0.3, 0.9]
    return [spec.model_params(weight=weights[i], density=densities[i], **extra) for i in range(n_models)]


@pytest.mark.parametrize("name", ["ties", "dare_ties", "breadcrumbs_ties"])
@pytest.mark.parametrize("n_models", [2, 3])
def test_kernels_bit_identical_to_reference_on_big_bfloat16_tensors(name, n_models):
    g = torch.Generator().manual_seed(n_models)
    base, _ = _tied_bf16(g, 160_000)
    xs = [(base.float() + 1e-3 * torch.randn(160_000, generator=g)).bfloat16() for _ in range(n_models)]
    base, xs = base.reshape(400, 400), [x.reshape(400, 400) for x in xs]
    spec = get_method(name)
    p = PerModel(_params(name, n_models))
    shareds = [spec.shared_params()]
    if name != "ties":
        shareds.append(spec.shared_params(rescale=True, normalize=True, **{"lambda": 0.8}))
    for shared in shareds:
        assert spec.kernel.supports(xs, base, p, shared)
        fast = run_method(spec, xs, base, p, shared, torch.Generator().manual_seed(7), out_dtype=torch.bfloat16)
        with kernels_disabled():
            slow = run_method(spec, xs, base, p, shared, torch.Generator().manual_seed(7), out_dtype=torch.bfloat16)
        assert torch.equal(fast.view(torch.int16), slow.view(torch.int16))


def test_elect_pair_and_elect_many_agree_with_the_consensus_primitives():
    from mergelab.methods.consensus import disjoint_mean, elect_sign

    g = torch.Generator().manual_seed(5)
    d = torch.randint(-3, 4, (2, 2000), generator=g).float() / 4  # zeros and sign ties included
    w = torch.tensor([0.5, 1.5])
    for normalize in (False, True):
        want = disjoint_mean(d, elect_sign(d), w, normalize=normalize)
        pair = [tk.elect_pair(np.float32(a), np.float32(b), np.float32(0.5), np.float32(1.5), normalize)
                for a, b in d.T.tolist()]
        many = [tk.elect_many(col.numpy(), w.numpy(), normalize) for col in d.T]
        assert torch.equal(torch.tensor(pair, dtype=torch.float32), want)
        assert torch.equal(torch.tensor(many, dtype=torch.float32), want)
