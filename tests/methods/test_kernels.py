"""Every compiled kernel against its method's readable reference, through the one chooser (run_method).

Kernels (methods/kernels/) read the inputs as stored and must give the reference's numbers: checked for
linear, ties, dare_ties, dare_linear, della, della_linear, breadcrumbs, breadcrumbs_ties and sce on
N = 2, 3 and 5 models (slerp: its pair), float32 and bfloat16 (float16 falls back to the reference),
masses of tied values, plus hand-worked cases for N = 2 and N = 3 that need neither implementation,
and the counter-based generator against a second implementation.
"""

import numpy as np
import pytest
import torch

from mergelab.methods import PerModel, get_method, run_method
from mergelab.methods.kernels import kernels_disabled
from mergelab.methods.linear import LinearModel, LinearShared
from mergelab.methods.sparsify import TaskVectorParams, TiesShared

tk = pytest.importorskip("mergelab.methods.kernels.ties")
lk = pytest.importorskip("mergelab.methods.kernels.linear")


def _quantised(shape, levels, gen):
    """Values on a coarse grid: task vectors full of ties, as differences of bfloat16 weights are."""
    return torch.randint(-levels, levels + 1, shape, generator=gen).float() / 8


def _tied_models(shape, n_models, dtype, gen):
    """(base, fine-tunes) in `dtype`, all on a coarse grid: masses of tied task-vector magnitudes."""
    base = _quantised(shape, 3, gen)
    xs = [(base + _quantised(shape, 2, gen)).to(dtype) for _ in range(n_models)]
    return base.to(dtype), xs


def _same_bits(a, b):
    """Whether two float32 or bfloat16 tensors hold the same bits (NaN payloads and -0.0 included)."""
    bits = torch.int16 if a.dtype == torch.bfloat16 else torch.int32
    return a.dtype == b.dtype and torch.equal(a.view(bits), b.view(bits))


def both(name, xs, base, params, shared, out_dtype):
    """(kernel result, reference result) of method `name` through run_method."""
    spec = get_method(name)
    p = PerModel(params)
    # the kernel itself, also where run_method would not pick it (tiny tensors run the reference)
    fast = spec.kernel.run(xs, base, p, shared, None, out_dtype)
    with kernels_disabled():
        slow = run_method(spec, xs, base, p, shared, out_dtype=out_dtype)
    return fast, slow


def close_in_dtype(fast, slow, dtype):
    assert fast.dtype == slow.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-6)
    else:  # rounding of float32 results that differ in the last bit may land one bf16 step apart
        diff = (fast.view(torch.int16).int() - slow.view(torch.int16).int()).abs()
        assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1e-3


@pytest.mark.parametrize("n_models", [2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [False, True])
def test_ties_kernel_equals_reference(n_models, dtype, tied):
    g = torch.Generator().manual_seed(n_models + 10 * tied)
    shape = (131, 1031)  # several kernel blocks, so tie cut-offs fall inside a block
    if tied:
        base, xs = _tied_models(shape, n_models, dtype, g)
    else:
        base = torch.randn(shape, generator=g)
        xs = [(base + 0.05 * torch.randn(shape, generator=g)).to(dtype) for _ in range(n_models)]
        base = base.to(dtype)
    params = [TaskVectorParams(weight=0.3 + 0.2 * i, density=min(1.0, 0.2 + 0.2 * i)) for i in range(n_models)]
    for shared in (TiesShared(), TiesShared(normalize=False, **{"lambda": 0.7})):
        for out_dtype in (torch.float32, dtype):
            close_in_dtype(*both("ties", xs, base, params, shared, out_dtype), out_dtype)


@pytest.mark.parametrize("n_models", [2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_kernel_equals_reference_and_float64(n_models, dtype):
    g = torch.Generator().manual_seed(n_models)
    xs = [torch.randn(257, 129, generator=g).to(dtype) for _ in range(n_models)]
    weights = [0.3, 0.5, 0.2, -0.4, 1.1][:n_models]
    params = [LinearModel(weight=w) for w in weights]
    for shared in (LinearShared(), LinearShared(normalize=False)):
        fast, slow = both("linear", xs, None, params, shared, torch.float32)
        total = sum(weights) if shared.normalize else 1.0
        want = sum(w / total * x.double() for w, x in zip(weights, xs))
        torch.testing.assert_close(fast.double(), want, rtol=1e-5, atol=1e-5)
        close_in_dtype(fast, slow, torch.float32)
        close_in_dtype(*both("linear", xs, None, params, shared, torch.bfloat16), torch.bfloat16)


def test_run_method_picks_the_ties_kernel_for_big_float_tensors_only():
    spec = get_method("ties")
    p = PerModel([TaskVectorParams(weight=1.0, density=0.5)] * 2)
    big, small = torch.zeros(tk.MIN_KERNEL_NUMEL), torch.zeros(tk.MIN_KERNEL_NUMEL - 1)
    assert spec.kernel.supports([big, big], big, p, TiesShared())
    assert not spec.kernel.supports([small, small], small, p, TiesShared())  # the reference is faster there
    assert not spec.kernel.supports([big, big], big, p, TiesShared(rescale=True))


def test_float16_and_float64_run_the_reference():
    spec = get_method("ties")
    half = [torch.zeros(8, dtype=torch.float16)] * 2
    p = PerModel([TaskVectorParams(weight=1.0)] * 2)
    assert not spec.kernel.supports(half, half[0], p, TiesShared())
    assert not spec.kernel.supports([torch.zeros(8)] * 2, torch.zeros(8, dtype=torch.float64), p, TiesShared())
    assert not get_method("linear").kernel.supports([torch.zeros(8, dtype=torch.float16)], None, p, LinearShared())
    out = run_method(spec, half, half[0], p, TiesShared())
    assert out.dtype == torch.float16


def test_hand_worked_ties_two_models_with_tied_magnitudes():
    # task vectors: a = [1, -1, 1, 1], b = [-2, 0, 0, 1]; density 0.5 keeps two of each.
    # a: all |1| tie, so the two lowest indices stay: [1, -1, 0, 0]; b: [-2, 0, 0, 1].
    # weights 1: sums [-1, -1, 0, 1] -> signs [-, -, +, +]; agreeing: [-2], [-1], [], [1].
    base = torch.zeros(4)
    xs = [torch.tensor([1.0, -1.0, 1.0, 1.0]), torch.tensor([-2.0, 0.0, 0.0, 1.0])]
    params = [TaskVectorParams(weight=1.0, density=0.5)] * 2
    for got in both("ties", xs, base, params, TiesShared(), torch.float32):
        assert got.tolist() == [-2.0, -1.0, 0.0, 1.0]


def test_hand_worked_ties_three_models():
    # base [1, 1, 1, 1, 1, 1]; task vectors
    #   a = [ 4, -1,  2,  0.5, -3, 1]   density 0.5 -> keep |4|, |-3|, |2|:  [4, 0, 2, 0, -3, 0]
    #   b = [-2,  3, -1,  0.5,  1, 1]   density 1/3 -> keep |3|, |-2|:       [-2, 3, 0, 0, 0, 0]
    #   c = [ 1,  1,  1, -1,   -1, 1]   density 1   -> all kept
    # weights 0.5, 1, 2: weighted rows a' = [2, 0, 1, 0, -1.5, 0], b' = [-2, 3, 0, 0, 0, 0], c' = [2, 2, 2, -2, -2, 2]
    # sums [2, 5, 3, -2, -3.5, 2] -> signs [+, +, +, -, -, +]
    # agreeing entries and their weights (normalize):
    #   0: a'=2 (0.5), c'=2 (2)   -> 4 / 2.5 = 1.6
    #   1: b'=3 (1),   c'=2 (2)   -> 5 / 3
    #   2: a'=1 (0.5), c'=2 (2)   -> 3 / 2.5 = 1.2
    #   3: c'=-2 (2)              -> -1
    #   4: a'=-1.5 (0.5), c'=-2 (2) -> -3.5 / 2.5 = -1.4
    #   5: c'=2 (2)               -> 1
    base = torch.ones(6)
    tau = [torch.tensor([4, -1, 2, 0.5, -3, 1]), torch.tensor([-2, 3, -1, 0.5, 1, 1]),
           torch.tensor([1.0, 1, 1, -1, -1, 1])]
    xs = [base + t for t in tau]
    params = [TaskVectorParams(weight=0.5, density=0.5), TaskVectorParams(weight=1.0, density=1 / 3),
              TaskVectorParams(weight=2.0, density=1.0)]
    want = base + torch.tensor([1.6, 5 / 3, 1.2, -1.0, -1.4, 1.0])
    for got in both("ties", xs, base, params, TiesShared(), torch.float32):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


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
        return tk.ties_merge([values], base, [None], [1.0], normalize=False, lam=1.0, out_dtype=dtype)

    full = merged(torch.float32)
    assert torch.equal(full[values != 0], values[values != 0])  # one model, weight 1: itself (-0.0 -> 0.0)
    assert torch.equal(merged(torch.bfloat16).view(torch.int16), full.to(torch.bfloat16).view(torch.int16))


def test_kernel_io_and_empty_tensors():
    assert np.asarray(tk.as_array(torch.zeros(3, dtype=torch.bfloat16))).dtype == np.uint16
    assert lk.weighted_sum([torch.zeros(0, 3)], [1.0]).shape == (0, 3)


def test_kth_largest_matches_kthvalue_on_big_tensors():
    from mergelab.methods import sparsify as sp

    g = torch.Generator().manual_seed(1)
    for flat in (torch.randn(600_000, generator=g).abs(), torch.randint(0, 7, (600_000,), generator=g).float()):
        n = flat.numel()
        for k in (1, 17, n // 3, n // 2, n - 1):
            assert sp.kth_largest(flat, k) == flat.kthvalue(n - k + 1).values


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_nonfinite_bit_check_agrees_with_isfinite(dtype):
    from mergelab.methods.kernels import finite

    g = torch.Generator().manual_seed(0)
    info = torch.finfo(dtype)
    base = torch.randn(300_000, generator=g).to(dtype)
    extremes = torch.tensor([info.max, -info.max, info.tiny, info.tiny / 4, -0.0, 0.0], dtype=dtype)
    clean = torch.cat([base, extremes])  # largest finite, subnormal, signed zero: all finite
    assert finite.supports(clean) and not finite.has_nonfinite(clean)
    for bad in (float("nan"), float("inf"), float("-inf")):
        for where in (0, 123_457, clean.numel() - 1):
            t = clean.clone()
            t[where] = bad
            assert finite.has_nonfinite(t) == (not bool(torch.isfinite(t).all())) == True  # noqa: E712
    assert not finite.has_nonfinite(torch.empty(0, dtype=dtype))


def test_has_nonfinite_never_mistakes_a_sum_overflow_for_nan():
    from mergelab.methods.kernels import has_nonfinite

    huge = torch.full((8, 4), 3e38)  # finite, but its float32 sum overflows to inf
    for t in (huge, huge.t()):  # contiguous: the bit kernel; transposed: the torch fallback
        assert not has_nonfinite(t)
        bad = t.clone()
        bad[1, 2] = float("nan")
        assert has_nonfinite(bad) and has_nonfinite(bad.t())
    assert not has_nonfinite(torch.arange(5))  # integers hold neither


# ----------------------------------------------------------------------------- thinned task vectors

THINNED = ["dare_ties", "dare_linear", "della", "della_linear", "breadcrumbs", "breadcrumbs_ties"]


def _thinned_params(name, n_models):
    spec = get_method(name)
    extra = {"epsilon": 0.1} if name.startswith("della") else {"gamma": 0.03} if name.startswith("breadcrumbs") else {}
    densities = [0.3, 0.5, 1.0, 0.7, 0.2]
    return [spec.model_params(weight=[0.6, 0.4, 1.1, -0.3, 0.8][i], density=densities[i], **extra)
            for i in range(n_models)]


def both_seeded(name, xs, base, params, shared, out_dtype, seed=3):
    """(kernel, reference) of a possibly random method, each with its own generator seeded alike."""
    spec = get_method(name)
    p = PerModel(params)
    fast = spec.kernel.run(xs, base, p, shared, torch.Generator().manual_seed(seed), out_dtype)
    with kernels_disabled():
        slow = run_method(spec, xs, base, p, shared, torch.Generator().manual_seed(seed), out_dtype=out_dtype)
    return fast, slow


@pytest.mark.parametrize("name", THINNED)
@pytest.mark.parametrize("n_models", [2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_thinned_kernels_equal_reference(name, n_models, dtype):
    # Quantised task vectors: masses of tied magnitudes (ranks and thresholds among ties).
    g = torch.Generator().manual_seed(n_models)
    base, xs = _tied_models((37, 301), n_models, dtype, g)
    spec = get_method(name)
    params = _thinned_params(name, n_models)
    assert spec.kernel.supports(xs, base, PerModel(params), spec.shared_params())
    for shared in (spec.shared_params(), spec.shared_params(normalize=True, rescale=True, **{"lambda": 0.7})):
        for out_dtype in (torch.float32, dtype):
            fast, slow = both_seeded(name, xs, base, params, shared, out_dtype)
            assert fast.dtype == slow.dtype == out_dtype
            # same masks, same float32 operations in the same order: the same bits
            assert _same_bits(fast, slow)


@pytest.mark.parametrize("name", THINNED)
def test_thinned_kernels_on_continuous_values_and_float16(name):
    g = torch.Generator().manual_seed(9)
    base = torch.randn(64, 257, generator=g)
    xs = [base + 0.05 * torch.randn(64, 257, generator=g) for _ in range(3)]
    spec = get_method(name)
    params = _thinned_params(name, 3)
    fast, slow = both_seeded(name, xs, base, params, spec.shared_params(rescale=True), torch.float32)
    assert torch.equal(fast, slow)
    half = [x.half() for x in xs]  # float16: no kernel, the reference runs
    assert not spec.kernel.supports(half, base.half(), PerModel(params), spec.shared_params())
    out = run_method(spec, half, base.half(), PerModel(params), spec.shared_params(), torch.Generator().manual_seed(1))
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_della_kernel_on_one_dimensional_tensors():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(5000, generator=g)
    xs = [base + 0.1 * torch.randn(5000, generator=g) for _ in range(2)]
    params = _thinned_params("della", 2)
    fast, slow = both_seeded("della", xs, base, params, get_method("della").shared_params(), torch.float32)
    assert torch.equal(fast, slow)


@pytest.mark.parametrize("name", ["della", "della_linear"])
@pytest.mark.parametrize("n_models", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 41, 7), (2, 5, 3, 4), (4, 1, 6)])
def test_della_kernel_ranks_along_dim_one_of_three_and_more_dims(name, n_models, dtype, shape):
    # The reference ranks |tau| along dim 1 (entries inner-size apart), ties by index: quantised
    # values give masses of ties; a size-1 dim 1 gives rows of one entry (p = density).
    base, xs = _tied_models(shape, n_models, dtype, torch.Generator().manual_seed(len(shape) + n_models))
    spec = get_method(name)
    params = _thinned_params(name, n_models)
    assert spec.kernel.supports(xs, base, PerModel(params), spec.shared_params())
    for shared in (spec.shared_params(), spec.shared_params(rescale=True, normalize=True)):
        fast, slow = both_seeded(name, xs, base, params, shared, dtype)
        assert fast.dtype == dtype and _same_bits(fast, slow)
    half = [x.half() for x in xs]  # float16: no kernel, the reference runs
    assert not spec.kernel.supports(half, base.half(), PerModel(params), spec.shared_params())


def test_thinned_kernel_does_not_depend_on_thread_count():
    numba = pytest.importorskip("numba")
    g = torch.Generator().manual_seed(5)
    base = torch.randn(300, 700, generator=g).bfloat16()
    xs = [(base.float() + 0.01 * torch.randn(300, 700, generator=g)).bfloat16() for _ in range(3)]
    params = _thinned_params("dare_ties", 3)
    spec = get_method("dare_ties")
    before = numba.get_num_threads()
    outs = []
    for threads in {1, before}:
        numba.set_num_threads(threads)
        try:
            outs.append(spec.kernel.run(xs, base, PerModel(params), spec.shared_params(),
                                        torch.Generator().manual_seed(8), torch.bfloat16))
        finally:
            numba.set_num_threads(before)
    assert all(torch.equal(o, outs[0]) for o in outs)


def _mix32_by_hand(h):
    # lowbias32 (C. Wellons), the finaliser written out again from its definition
    h = (h ^ (h >> 16)) * 0x21F0AAAD % 2**32
    h = (h ^ (h >> 15)) * 0x735A2D97 % 2**32
    return h ^ (h >> 15)


def test_counter_rng_against_a_second_implementation_and_chunking():
    from mergelab.methods.counter_rng import stream_keys, uniform

    key = 0x1234_5678_9ABC_DEF0
    for stream in (0, 1, 4):
        k0, k1 = stream_keys(key, stream)
        for j in (0, 1, 2**20 + 7, 2**32 + 5):  # an index past 2**32 uses the high word
            h = _mix32_by_hand(_mix32_by_hand((j % 2**32) ^ k0) ^ (j >> 32) ^ k1)
            assert uniform(key, stream, j, j + 1).item() == (h >> 8) / 2**24
        # entry j's uniform does not depend on the range it is drawn in
        whole = uniform(key, stream, 0, 5000)
        assert torch.equal(torch.cat([uniform(key, stream, 0, 1234), uniform(key, stream, 1234, 5000)]), whole)
    a, b = uniform(key, 0, 0, 200_000), uniform(key, 1, 0, 200_000)
    assert abs(float(a.mean()) - 0.5) < 0.005 and abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 0.01
    assert abs(float((a < 0.3).float().mean()) - 0.3) < 5 * (0.21 / 200_000) ** 0.5


def test_hand_worked_dare_linear_three_models():
    # base 0; task vectors of 4 entries; the masks are whatever the counter-based generator
    # draws (read from it here), the rest is worked by hand:
    #   tau_i * mask_i, rescaled to its former L1 norm, times w_i, summed, divided by sum w.
    from mergelab.methods.counter_rng import keep_mask

    base = torch.zeros(4)
    taus = [torch.tensor([1.0, -2.0, 3.0, 4.0]), torch.tensor([2.0, 2.0, -1.0, 1.0]),
            torch.tensor([0.5, -0.5, 0.5, -0.5])]
    weights, density, seed = [1.0, 2.0, 1.0], 0.5, 21
    spec = get_method("dare_linear")
    params = [spec.model_params(weight=w, density=density) for w in weights]
    want = torch.zeros(4, dtype=torch.float64)
    for i, (tau, w) in enumerate(zip(taus, weights)):
        m = keep_mask((4,), density, seed, i).tolist()
        kept = [t if k else 0.0 for t, k in zip(tau.tolist(), m)]
        l1_kept = sum(abs(v) for v in kept)
        scale = sum(abs(v) for v in tau.tolist()) / l1_kept if l1_kept else 1.0
        want += torch.tensor([w * v * scale for v in kept], dtype=torch.float64)
    want /= sum(weights)
    shared = spec.shared_params(normalize=True)
    for got in both_seeded("dare_linear", taus, base, params, shared, torch.float32, seed=seed):
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_hand_worked_breadcrumbs_ties_three_models():
    # base 1; density 0.5 and gamma 0.25 on 4 entries: drop the largest |tau|, keep the next 2.
    #   a = [ 4, -1,  2, -3] -> drop 4, keep -3, 2:  [0, 0, 2, -3]
    #   b = [-1,  3, -2,  1] -> drop 3, keep -2 and (|-1| = |1|: lower index) -1: [-1, 0, -2, 0]
    #   c = [ 1,  1,  1,  1] density 1: kept whole
    # weights 1, 1, 2 -> rows [0, 0, 2, -3], [-1, 0, -2, 0], [2, 2, 2, 2]
    # sums [1, 2, 2, -1] -> signs [+, +, +, -]; agreeing (no normalize): [2, 2, 4, -3]
    base = torch.ones(4)
    taus = [torch.tensor([4.0, -1, 2, -3]), torch.tensor([-1.0, 3, -2, 1]), torch.ones(4)]
    spec = get_method("breadcrumbs_ties")
    params = [spec.model_params(weight=w, density=d, gamma=0.25) for w, d in ((1, 0.5), (1, 0.5), (2, 1.0))]
    want = base + torch.tensor([2.0, 2, 4, -3])
    for got in both_seeded("breadcrumbs_ties", [base + t for t in taus], base, params, spec.shared_params(),
                           torch.float32):
        assert torch.equal(got, want)


# ----------------------------------------------------------------------------- slerp and sce


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slerp_kernel_equals_reference_and_the_formula(dtype):
    spec = get_method("slerp")
    g = torch.Generator().manual_seed(6)
    a = torch.randn(211, 307, generator=g).to(dtype)
    cases = {"general": (a.float() * 0.6 + torch.randn(211, 307, generator=g)).to(dtype),
             "colinear": (a.float() * 2).to(dtype), "antipodal": (-a.float()).to(dtype),
             "zero": torch.zeros(211, 307, dtype=dtype)}
    for label, b in cases.items():
        for t in (0.0, 0.25, 1.0):
            s = spec.shared_params(t=t)
            fast = spec.kernel.run([b], a, PerModel([]), s, None, dtype)
            with kernels_disabled():
                slow = run_method(spec, [b], a, PerModel([]), s, out_dtype=dtype)
            assert torch.equal(fast, slow), (label, t)
        # second formula, in float64: sin((1-t) w)/sin w a + sin(t w)/sin w b, lerp when nearly colinear
        a64, b64 = a.double().reshape(-1), b.double().reshape(-1)
        cos = float(a64 @ b64 / max(a64.norm(), 1e-8) / max(b64.norm(), 1e-8)) if b64.norm() > 1e-8 else 0.0
        if abs(cos) > 0.9995:
            want = 0.75 * a64 + 0.25 * b64
        else:
            w = np.arccos(cos)
            want = np.sin(0.75 * w) / np.sin(w) * a64 + np.sin(0.25 * w) / np.sin(w) * b64
        got = spec.kernel.run([b], a, PerModel([]), spec.shared_params(t=0.25), None, torch.float32)
        torch.testing.assert_close(got.double().reshape(-1), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_models", [2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sce_kernel_equals_reference(n_models, dtype):
    from mergelab.methods import NoParams

    spec = get_method("sce")
    g = torch.Generator().manual_seed(n_models)
    base, xs = _tied_models((97, 211), n_models, dtype, g)
    p = PerModel([NoParams()] * n_models)
    assert spec.kernel.supports(xs, base, p, spec.shared_params())
    assert not spec.kernel.supports(xs, base, p, spec.shared_params(select_topk=0.5))  # variance: reference
    for out_dtype in (torch.float32, dtype):
        fast = spec.kernel.run(xs, base, p, spec.shared_params(), None, out_dtype)
        with kernels_disabled():
            slow = run_method(spec, xs, base, p, spec.shared_params(), out_dtype=out_dtype)
        assert torch.equal(fast, slow)


def test_hand_worked_sce_three_models():
    # base 0; tau = [1, -2], [3, 1], [0, -2]: mean squares 2.5, 5, 2 -> eta = [2.5, 5, 2] / 9.5
    # signs of the sums [4, -3]: [+, -]. Entry 0: models 0, 1 agree: (2.5*1 + 5*3) / (2.5 + 5) = 17.5/7.5;
    # entry 1: models 0, 2 agree: (2.5*-2 + 2*-2) / (2.5 + 2) = -2.
    from mergelab.methods import NoParams

    xs = [torch.tensor([1.0, -2.0] * 70_000), torch.tensor([3.0, 1.0] * 70_000), torch.tensor([0.0, -2.0] * 70_000)]
    base = torch.zeros(140_000)
    spec = get_method("sce")
    got = spec.kernel.run(xs, base, PerModel([NoParams()] * 3), spec.shared_params(), None, torch.float32)
    torch.testing.assert_close(got[:2], torch.tensor([17.5 / 7.5, -2.0]), rtol=1e-6, atol=1e-6)
    assert torch.equal(got.view(-1, 2), got[:2].expand(70_000, 2))


@pytest.mark.parametrize("n_models", [1, 2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_task_arithmetic_kernel_equals_reference_bit_for_bit_and_float64(n_models, dtype):
    """Same float32 operations in the reference's order: the same bits, in float32 and after rounding
    to bfloat16; and within float32 rounding of the formula in float64."""
    from mergelab.methods.task_arithmetic import TaskArithmeticParams, TaskArithmeticShared

    g = torch.Generator().manual_seed(10 + n_models)
    base = torch.randn(301, 67, generator=g).to(dtype)
    xs = [(base.float() + 0.05 * torch.randn(301, 67, generator=g)).to(dtype) for _ in range(n_models)]
    weights = [0.3, 0.55, -0.2, 0.9, 1.1][:n_models]
    params = [TaskArithmeticParams(weight=w) for w in weights]
    for shared in (TaskArithmeticShared(), TaskArithmeticShared(normalize=True),
                   TaskArithmeticShared(**{"lambda": 0.7}), TaskArithmeticShared(normalize=True, **{"lambda": 1.3})):
        for out_dtype in (torch.float32, torch.bfloat16):
            fast, slow = both("task_arithmetic", xs, base, params, shared, out_dtype)
            assert _same_bits(fast, slow), (shared, out_dtype)
        fast, _ = both("task_arithmetic", xs, base, params, shared, torch.float32)
        b = base.double()
        total = sum(weights) if shared.normalize else 1.0
        want = b + shared.lambda_ * sum(w * (x.double() - b) for w, x in zip(weights, xs)) / total
        torch.testing.assert_close(fast.double(), want, rtol=1e-5, atol=1e-5)
    # float16 out: rounded from float32 like the reference's result
    fast, slow = both("task_arithmetic", xs, base, params, TaskArithmeticShared(), torch.float16)
    assert fast.dtype == torch.float16 and torch.equal(fast.view(torch.int16), slow.view(torch.int16))


def test_task_arithmetic_kernel_refuses_weights_summing_to_zero_with_normalize():
    from mergelab.errors import MergeError
    from mergelab.methods.task_arithmetic import TaskArithmeticParams, TaskArithmeticShared

    base, xs = torch.zeros(8), [torch.ones(8), torch.ones(8)]
    params = PerModel([TaskArithmeticParams(weight=0.5), TaskArithmeticParams(weight=-0.5)])
    with pytest.raises(MergeError, match="sum to zero"):
        get_method("task_arithmetic").kernel.run(xs, base, params, TaskArithmeticShared(normalize=True), None,
                                                 torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nearswap_kernel_equals_reference_bit_for_bit(dtype):
    """Distances below, at and above t and below the 1e-6 floor: the reference's bits in every case."""
    from mergelab.methods.linear import NearswapShared

    g = torch.Generator().manual_seed(5)
    base = torch.randn(203, 31, generator=g).to(dtype)
    step = torch.randn(203, 31, generator=g) * torch.logspace(-8, 0, 31)  # columns from 1e-8 to 1 apart
    v = (base.float() + step).to(dtype)
    v[0, :5] = base[0, :5]  # equal entries: the distance floor
    for t in (0.0, 1e-4, 0.01, 0.3, 5.0):
        for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
            fast, slow = both("nearswap", [v], base, [None], NearswapShared(t=t), out_dtype)
            assert fast.dtype == slow.dtype == out_dtype
            bits = torch.int16 if out_dtype != torch.float32 else torch.int32
            assert torch.equal(fast.view(bits), slow.view(bits)), (t, out_dtype)
    fast, _ = both("nearswap", [v], base, [None], NearswapShared(t=0.01), torch.float32)
    d = (base.double() - v.double()).abs().clamp_min(1e-6)
    w = (0.01 / d).clamp(0, 1)
    torch.testing.assert_close(fast.double(), w * v.double() + (1 - w) * base.double(), rtol=1e-6, atol=1e-6)
