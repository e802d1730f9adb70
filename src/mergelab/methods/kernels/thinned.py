"""DARE, DELLA and breadcrumbs on the CPU in two compiled passes (numba).

The readable methods (methods/sparsify.py) build each thinned task vector as a
float32 tensor, then weight, elect and combine. Here, from the inputs as stored
(bfloat16 bits or float32):

    masks: one pass decides, per model i and entry j, whether entry j of task
        vector i survives, into a byte per entry, and sums |tau_i| before and
        after thinning in float64 (for the L1 rescale):
          random (DARE)   uniform(key, i, j) < density_i, the counter-based
                          generator of methods/counter_rng.py, so the bits are
                          those the reference draws, whatever the blocking;
          della (DELLA)   uniform(key, i, j) < p_ij, p_ij linear in the rank of
                          |tau_ij| in its row (a stable radix sort of the bits of
                          |tau|: ties rank by index, as in the reference's stable sort);
          band            (breadcrumbs) rank in the top k + n_top magnitudes but not
                          in the top n_top: thresholds and tie cut-offs from the
                          TIES kernel's selection (kernels/ties.py). breadcrumbs_ties
                          without rescale needs neither masks nor norms: its band
                          goes straight into TIES's combining pass (combine_ranges);
    combine: per entry, tau_i = (x_i - base) * mask * factor_i * w_i in the
        reference's float32 order, then the weighted sum (/ sum w, * lambda) or
        sign election and disjoint mean (the TIES kernel's elect_pair/elect_many),
        plus the base, rounded to the output dtype in the same pass.

Same numbers as the reference: the masks are identical, and every float32
operation per entry is the reference's, in its order; only the float64 L1
sums are added in another order, which can move a rescale factor by one
float32 step in rare cases.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from mergelab.methods.counter_rng import generator_key, stream_keys
from mergelab.methods.kernels import one_thread
from mergelab.methods.kernels.io import as_array, load, store, store_dtype, usable
from mergelab.methods.kernels.rng import uniform
from mergelab.methods.kernels.ties import combine_ranges, elect_many, elect_pair

__all__ = ["supports", "run"]

_BLOCK = 1 << 16
_TILE = 4096  # entries per slice of the one-thread passes
_M32 = np.uint64(0xFFFFFFFF)
_S32 = np.uint64(32)
_ONE, _ZERO, _TWO = np.float32(1.0), np.float32(0.0), np.float32(2.0)


# The mask passes sum |tau| in float64 with reassociation allowed (so the sums vectorise):
# the order of float64 additions is not the reference's anyway. No other float operation
# there is affected (a subtraction, an abs, an exact scaling, comparisons).
@njit(parallel=True, nogil=True, cache=True)
def _random_mask(k0, k1, density, mask):
    """mask[j] = uniform(k, j) < density: a flat loop, so the compiler vectorises the hash."""
    for j in prange(mask.shape[0]):
        mask[j] = uniform(k0, k1, j) < density


@njit(nogil=True, cache=True, fastmath={"reassoc"})
def _block_l1(x, base, mask):
    """(sum |x - base|, sum over kept entries) of one block in float64 (SIMD lanes)."""
    before, after = 0.0, 0.0
    for j in range(base.shape[0]):
        a = np.float64(abs(load(x, j) - load(base, j)))
        before += a
        after += a if mask[j] else 0.0
    return before, after


@njit(parallel=True, nogil=True, cache=True)
def _l1_sums(x, base, mask):
    """(blocks, 2) float64 L1 sums of one task vector before/after thinning, per _BLOCK entries."""
    n = base.shape[0]
    blocks = (n + _BLOCK - 1) // _BLOCK
    out = np.zeros((blocks, 2), dtype=np.float64)
    for blk in prange(blocks):
        lo = blk * _BLOCK
        hi = min(n, lo + _BLOCK)
        before, after = _block_l1(x[lo:hi], base[lo:hi], mask[lo:hi])
        out[blk, 0] = before
        out[blk, 1] = after
    return out


def _dare_masks(xs, base, thinned, densities, keys, masks) -> np.ndarray:
    """DARE's masks and (models, 2) L1 sums, in two vectorised passes per model (one blocked pass was 4-7x slower)."""
    totals = np.zeros((len(xs), 2), dtype=np.float64)
    for i in range(len(xs)):
        if thinned[i]:
            _random_mask(keys[i, 0], keys[i, 1], densities[i], masks[i])
            totals[i] = _l1_sums(xs[i], base, masks[i]).sum(axis=0)
    return totals


_RADIX = 11  # bits per digit of the row sort: three passes over 32-bit keys
_DIGITS = 1 << _RADIX


@njit(nogil=True, cache=True)
def _sort_row(keys, idx, spare_keys, spare_idx, hist):
    """Stable LSD radix sort of keys (uint32) carrying idx; returns the sorted (keys, idx) pair of arrays.

    Stable, so entries of equal key stay in index order, as the reference's stable argsort keeps them.
    A pass whose digit is the same for every key moves nothing and is skipped.
    """
    cols = keys.shape[0]
    for shift in range(0, 32, _RADIX):
        hist[:] = 0
        for c in range(cols):
            hist[(keys[c] >> shift) & (_DIGITS - 1)] += 1
        if hist.max() == cols:
            continue
        start = 0
        for d in range(_DIGITS):
            count = hist[d]
            hist[d] = start
            start += count
        for c in range(cols):
            d = (keys[c] >> shift) & (_DIGITS - 1)
            pos = hist[d]
            hist[d] = pos + 1
            spare_keys[pos] = keys[c]
            spare_idx[pos] = idx[c]
        keys, spare_keys = spare_keys, keys
        idx, spare_idx = spare_idx, idx
    return keys, idx


@njit(parallel=True, nogil=True, cache=True)
def _della_masks(xs, base, cols, inner, thinned, densities, epsilons, k0s, k1s, masks):
    """DELLA's masks row by row; returns (rows, models, 2) L1 sums before/after.

    The tensor is read as (outer, cols, inner) and ranked along cols, as the
    reference ranks along dim 1: a row is `cols` entries `inner` apart
    (inner = 1 for a matrix, the product of the trailing sizes for 3-D and up).

    p = rank / (cols - 1) * 2 * epsilon + (density - epsilon) in float32, in the
    reference's order of operations (della_keep_probabilities); p = density for one-entry rows.
    Ranks come from a stable radix sort of the float32 bit patterns of |tau| (which order
    like the values, for non-negative floats).
    """
    n, models = base.shape[0], len(xs)
    rows = n // cols
    norms = np.zeros((rows, models, 2), dtype=np.float64)
    for r in prange(rows):
        keys, spare_keys = np.empty(cols, dtype=np.uint32), np.empty(cols, dtype=np.uint32)
        idx, spare_idx = np.empty(cols, dtype=np.int64), np.empty(cols, dtype=np.int64)
        hist = np.empty(_DIGITS, dtype=np.int64)
        lo = (r // inner) * cols * inner + r % inner  # entry c of the row is lo + c * inner
        for i in range(models):
            if not thinned[i]:
                continue
            xi, mi, k0, k1 = xs[i], masks[i], k0s[i], k1s[i]
            density = np.float32(densities[i])
            low = np.float32(densities[i] - epsilons[i])
            eps = np.float32(epsilons[i])
            before, after = 0.0, 0.0
            for c in range(cols):
                keys[c] = np.float32(abs(load(xi, lo + c * inner) - load(base, lo + c * inner))).view(np.uint32)
                idx[c] = c
            sorted_keys, order = _sort_row(keys, idx, spare_keys, spare_idx, hist)
            for rank in range(cols):
                c = order[rank]
                if cols < 2:
                    p = density
                else:
                    p = np.float32(rank) / np.float32(cols - 1) * _TWO * eps + low
                j = lo + c * inner
                keep = uniform(k0, k1, j) < p
                mi[j] = keep
                a64 = np.float64(np.uint32(sorted_keys[rank]).view(np.float32))
                before += a64
                after += a64 if keep else 0.0
            norms[r, i, 0] = before
            norms[r, i, 1] = after
    return norms


@njit(parallel=True, nogil=True, cache=True, fastmath={"reassoc"})
def _band_masks(xs, base, thinned, lows, low_cuts, highs, high_cuts, masks):
    """Breadcrumbs: keep |d| in the top (k + n_top) but not the top n_top, ties by index.

    Entry j is in model i's top m when |d| > T, or |d| == T and j < cut-off (kernels/ties.py's
    thresholds); lows/low_cuts describe the top k + n_top, highs/high_cuts the top n_top
    (high_cuts[i] < 0: no outliers removed). Returns (blocks, models, 2) L1 sums before/after.
    """
    n, models = base.shape[0], len(xs)
    blocks = (n + _BLOCK - 1) // _BLOCK
    norms = np.zeros((blocks, models, 2), dtype=np.float64)
    for blk in prange(blocks):
        lo, hi = blk * _BLOCK, min(n, (blk + 1) * _BLOCK)
        for i in range(models):
            if not thinned[i]:
                continue
            xi, mi = xs[i], masks[i]
            t_low, c_low, t_high, c_high = lows[i], low_cuts[i], highs[i], high_cuts[i]
            before, after = 0.0, 0.0
            for j in range(lo, hi):
                a = abs(load(xi, j) - load(base, j))
                keep = a > t_low or (a == t_low and j < c_low)
                if c_high >= 0 and (a > t_high or (a == t_high and j < c_high)):
                    keep = False
                mi[j] = keep
                before += np.float64(a)
                after += np.float64(a) if keep else 0.0
            norms[blk, i, 0] = before
            norms[blk, i, 1] = after
    return norms


# The combining passes run on one thread (see kernels/ties.py): they vectorise, and a parallel
# region on this 2-core machine waits for whichever thread the engine's I/O threads hold up.
@njit(nogil=True, cache=True)
def _combine(xs, base, masks, factors, weights, ties, normalize, divisor, lam, out):
    """out = base + lambda * (weighted sum / divisor, or disjoint mean of the agreeing entries)."""
    n, models = base.shape[0], len(xs)
    t = np.empty(models, dtype=np.float32)
    for j in range(n):
        b = load(base, j)
        for i in range(models):
            # x * 1.0 is exact, so models kept whole (mask all True, factor 1) need no branch
            v = (load(xs[i], j) - b) * (_ONE if masks[i, j] else _ZERO)
            t[i] = v * factors[i] * weights[i]
        if ties:
            merged = elect_many(t, weights, normalize)
        else:
            merged = t[0]
            for i in range(1, models):
                merged += t[i]
            if normalize:
                merged = merged / divisor
        store(out, j, b + lam * merged)


@njit(nogil=True, cache=True)
def _combine_pair(x0, x1, base, m0, m1, factors, weights, ties, normalize, divisor, lam, out):
    """_combine for two models, over slices of _TILE entries (the compiler vectorises loops over them)."""
    f0, f1, w0, w1 = factors[0], factors[1], weights[0], weights[1]
    n = base.shape[0]
    for j0 in range(0, n, _TILE):
        j1 = min(n, j0 + _TILE)
        a0, a1, bs, k0, k1, o = x0[j0:j1], x1[j0:j1], base[j0:j1], m0[j0:j1], m1[j0:j1], out[j0:j1]
        for t in range(j1 - j0):
            b = load(bs, t)
            v0 = (load(a0, t) - b) * (_ONE if k0[t] else _ZERO)
            v1 = (load(a1, t) - b) * (_ONE if k1[t] else _ZERO)
            v0 = v0 * f0 * w0
            v1 = v1 * f1 * w1
            if ties:
                merged = elect_pair(v0, v1, w0, w1, normalize)
            else:
                merged = v0 + v1
                if normalize:
                    merged = merged / divisor
            store(o, t, b + lam * merged)


@njit(parallel=True, nogil=True, cache=True)
def _combine_pair_linear(x0, x1, base, m0, m1, factors, weights, divisor, lam, out):
    """_combine_pair without sign election (dare_linear, della_linear), branch-free so that it is one
    flat loop the compiler vectorises; divisor 1 without normalize (x / 1 is exact)."""
    f0, f1, w0, w1 = factors[0], factors[1], weights[0], weights[1]
    for j in prange(base.shape[0]):
        b = load(base, j)
        v0 = (load(x0, j) - b) * np.float32(m0[j])  # x * 1.0 and x * 0.0, as _combine_pair's branch
        v1 = (load(x1, j) - b) * np.float32(m1[j])
        store(out, j, b + lam * ((v0 * f0 * w0 + v1 * f1 * w1) / divisor))


# ---------------------------------------------------------------------------- python side

_EPS = 1e-7  # rescale_to_norm's threshold


def _band_thresholds(xs: tuple[np.ndarray, ...], base: np.ndarray, p, numel: int):
    """(lows, low_cuts, highs, high_cuts) of every model's magnitude band (keep_magnitude_band's rule)."""
    import math
    from fractions import Fraction

    from mergelab.methods.kernels.ties import _thresholds
    from mergelab.methods.trim import keep_count

    keeps, tops = [], []
    for q in p:
        k = keep_count(q.density, numel)
        n_top = min(math.floor(Fraction(repr(float(q.gamma))) * numel), numel - k)
        keeps.append(None if q.density >= 1 else k + n_top)
        tops.append(n_top if q.density < 1 and n_top > 0 else None)
    # one selection for both bounds of every model: its histogram passes read the base once
    both, cuts = _thresholds(xs + xs, base, keeps + [t if t is not None else numel for t in tops])
    m = len(xs)
    lows, low_cuts, highs, high_cuts = both[:m], cuts[:m], both[m:], cuts[m:]
    high_cuts = np.where([t is None for t in tops], -1, high_cuts).astype(np.int64)
    # a model whose k + n_top is the whole tensor keeps every entry of the lower bound
    low_cuts = np.where([k is None or k >= numel for k in keeps], numel, low_cuts).astype(np.int64)
    lows = np.where([k is None or k >= numel for k in keeps], np.float32(-1.0), lows).astype(np.float32)
    return lows, low_cuts, highs.astype(np.float32), high_cuts


def _rescale_factors(totals: np.ndarray | None, thinned: np.ndarray, rescale: bool) -> np.ndarray:
    """Each model's L1 rescale factor (norm before / norm after its mask), 1 where not rescaled."""
    factors = np.ones(len(thinned), dtype=np.float32)
    for i in range(len(thinned)):
        before, after = (float(totals[i, 0]), float(totals[i, 1])) if thinned[i] else (0.0, 0.0)
        if rescale and thinned[i] and before >= _EPS and after >= _EPS:
            factors[i] = np.float32(before / after)
    return factors


def run(xs: Sequence[Tensor], base: Tensor, p, s, gen, out_dtype: torch.dtype, *, mask: str,
        ties: bool) -> Tensor:
    """dare_*/della*/breadcrumbs* (methods/sparsify.py) on the inputs as stored, rounded to out_dtype."""
    from mergelab.methods.primitives import require_generator
    from mergelab.methods.primitives import weight_divisor

    models, numel = len(xs), base.numel()
    out = torch.empty(numel, dtype=store_dtype(out_dtype))
    if numel == 0:
        return out.reshape(base.shape).to(out_dtype)
    if mask != "band":
        require_generator("this method", gen)
    rows = tuple(as_array(t) for t in xs)
    b = as_array(base)
    if mask == "band" and ties and not s.rescale:
        # no mask and no norms needed: the band's bounds go straight into TIES's combining pass
        lows, low_cuts, highs, high_cuts = _band_thresholds(rows, b, p, numel)
        keep_all = np.array([q.density >= 1 for q in p], dtype=np.bool_) | (lows < 0)
        highs = np.where(high_cuts < 0, np.float32(np.nan), highs).astype(np.float32)
        high_cuts = np.where(high_cuts < 0, numel, high_cuts).astype(np.int64)
        combine_ranges(rows, b, (lows, low_cuts), (highs, high_cuts), keep_all, [float(q.weight) for q in p],
                       normalize=bool(s.normalize), lam=float(s.lambda_), out=as_array(out))
        return out.reshape(base.shape).to(out_dtype)
    thinned = np.array([q.density < 1 for q in p], dtype=np.bool_)
    # rows of models kept whole stay True; torch allocates (with huge pages where the CLI enabled them)
    masks = torch.ones((models, numel), dtype=torch.bool).numpy()
    if thinned.any():
        if mask == "band":
            norms = _band_masks(rows, b, thinned, *_band_thresholds(rows, b, p, numel), masks)
        else:
            keys = np.array([stream_keys(generator_key(gen), i) for i in range(models)], dtype=np.uint64)
            densities = np.array([q.density for q in p], dtype=np.float32)
            if mask == "random":
                with one_thread():
                    totals = _dare_masks(rows, b, thinned, densities, keys, masks)
            else:
                cols = base.shape[1] if base.dim() >= 2 else numel
                inner = numel // (base.shape[0] * cols) if base.dim() >= 2 else 1
                norms = _della_masks(rows, b, cols, inner, thinned, np.array([q.density for q in p], dtype=np.float64),
                                     np.array([q.epsilon for q in p], dtype=np.float64),
                                     keys[:, 0].copy(), keys[:, 1].copy(), masks)
        if mask != "random":
            totals = norms.sum(axis=0)  # (models, 2) float64
    factors = _rescale_factors(totals if thinned.any() else None, thinned, bool(s.rescale))
    weights = torch.tensor([float(q.weight) for q in p], dtype=torch.float32)
    divisor = weight_divisor(weights) if s.normalize and not ties else 1.0
    args = (factors, weights.numpy(), ties, bool(s.normalize), np.float32(divisor), np.float32(s.lambda_),
            as_array(out))
    if models == 2 and not ties:
        with one_thread():
            _combine_pair_linear(rows[0], rows[1], b, masks[0], masks[1], factors, weights.numpy(),
                                 np.float32(divisor if s.normalize else 1.0), np.float32(s.lambda_), as_array(out))
    elif models == 2:
        _combine_pair(rows[0], rows[1], b, masks[0], masks[1], *args)
    else:
        _combine(rows, b, masks, *args)
    return out.reshape(base.shape).to(out_dtype)


def supports(xs: Sequence[Tensor], base: Tensor | None, p, s, *, mask: str, ties: bool) -> bool:
    """CPU inputs all bfloat16 or all float32, one parameter set per model (DELLA: any number of dims)."""
    return base is not None and len(xs) > 0 and len(p) == len(xs) and usable([*xs, base])
