"""TIES on the CPU in a few streaming passes, compiled with numba.

The readable TIES (methods/sparsify.py) runs some thirty tensor
operations per block and needs every input converted to float32 first. Here
each pass reads the inputs once, in their storage dtype (bfloat16 bits or
float32), and does all its arithmetic per element in float32 registers:

    threshold, per model i: the exact k-th largest T_i of |theta_i - theta_base|
        by radix selection in two histogram passes: the top 16 bits of the
        float32 pattern (which orders like the value for non-negative floats)
        pick a bucket, the low 16 bits inside that bucket pick T_i. No sort and
        no sample, so masses of tied values (common: differences of bfloat16
        numbers take few distinct values) cost nothing extra. The low pass
        also counts ties per part of the tensor: when only some entries equal
        to T_i fit in k, a scan of one part finds the index from which they
        are dropped (lowest index first, as top_k_mask keeps them);
    combine: trim, weight, elect the sign, disjoint mean and add to the base,
        per element for two models (the common case), in tiles that stay in
        L1 cache for more.

The numbers are those of sparsify.ties (same float32 operations in
the same order per element: bit for bit on the tests). Inputs are never written.
"""

from __future__ import annotations

from collections.abc import Sequence

import numba
import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from mergelab.methods.kernels.io import as_array, load, store, usable

__all__ = ["available", "ties_combine", "ties_merge"]

_BLOCK = 1 << 16  # elements per parallel block of the combine pass
_BUCKETS = 1 << 16
_TILE = 512  # elements per tile: every model's slice of a tile stays in L1


@njit(inline="always")
def _bits(value):
    return np.float32(value).view(np.uint32)


@njit(parallel=True, cache=True)
def _histograms(xs, base, highs, parts):
    """Counts of 16 bits of the float32 pattern of |xs[i] - base|, per model i and per part of the tensor.

    highs[i] == -1: the top 16 bits of every entry. highs[i] >= 0: the low 16
    bits of the entries whose top 16 bits equal highs[i]; the others are
    skipped by a branch that is rarely taken, as such a bucket holds a small
    share of the entries (counting them in a spare bin would make every
    increment wait for the last). highs[i] < -1: model i is skipped. One pass
    serves every model, so the base is read once.
    """
    n = base.shape[0]
    partial = np.zeros((len(xs), parts, _BUCKETS), dtype=np.int32)
    step = (n + parts - 1) // parts
    for t in prange(parts):
        for j in range(t * step, min(n, (t + 1) * step)):
            b = load(base, j)
            for i in range(len(xs)):
                high = highs[i]
                if high < -1:
                    continue
                bits = np.int64(_bits(abs(load(xs[i], j) - b)))
                if high < 0:
                    partial[i, t, bits >> 16] += 1
                elif (bits >> 16) == high:
                    partial[i, t, bits & 0xFFFF] += 1
    return partial


@njit(cache=True)
def _select(hist, k):
    """(bucket, entries in higher buckets) of the k-th largest entry, counting from the top bucket."""
    above = 0
    for bucket in range(hist.shape[0] - 1, -1, -1):
        if above + hist[bucket] >= k:
            return bucket, above
        above += hist[bucket]
    return 0, above


@njit(cache=True)
def _tie_cutoff(x, base, threshold, start, stop, keep):
    """Index of the (keep + 1)-th entry in start:stop with |x - base| == threshold (stop if none)."""
    seen = 0
    for j in range(start, stop):
        if abs(load(x, j) - load(base, j)) == threshold:
            if seen == keep:
                return j
            seen += 1
    return stop


@njit(parallel=True, cache=True)
def _combine(x, base, lo, hi, floors, keep_all, weights, normalize, lam, out):
    """out[lo:hi] = base + lam * disjoint mean of the trimmed, weighted task vectors.

    Entry j of task vector i is kept when |d| >= floors[i] (or always, keep_all[i]).
    """
    models = len(x)
    blocks = (hi - lo + _BLOCK - 1) // _BLOCK
    for blk in prange(blocks):
        d = np.empty((models, _TILE), dtype=np.float32)
        total = np.empty(_TILE, dtype=np.float32)
        merged = np.empty(_TILE, dtype=np.float32)
        divisor = np.empty(_TILE, dtype=np.float32)
        stop = min(hi, lo + (blk + 1) * _BLOCK)
        for j0 in range(lo + blk * _BLOCK, stop, _TILE):
            width = min(_TILE, stop - j0)
            for i in range(models):
                xi, di, floor, everything, w = x[i], d[i], floors[i], keep_all[i], weights[i]
                for t in range(width):
                    v = load(xi, j0 + t) - load(base, j0 + t)
                    di[t] = (v if everything or abs(v) >= floor else np.float32(0.0)) * w
            for t in range(width):
                total[t] = d[0, t]
                merged[t] = np.float32(0.0)
                divisor[t] = np.float32(0.0)
            for i in range(1, models):
                for t in range(width):
                    total[t] += d[i, t]
            for i in range(models):
                di, w = d[i], weights[i]
                for t in range(width):
                    # sign(total) is +1 where total >= 0: agreeing entries are > 0 there, < 0 elsewhere
                    agree = di[t] > 0 if total[t] >= 0 else di[t] < 0
                    merged[t] += di[t] if agree else np.float32(0.0)
                    divisor[t] += w if agree else np.float32(0.0)
            for t in range(width):
                m = merged[t]
                if normalize:
                    m = m / (divisor[t] if divisor[t] != 0 else np.float32(1.0))
                store(out, j0 + t, load(base, j0 + t) + lam * m)


@njit(parallel=True, cache=True)
def _combine_pair(x, base, lo, hi, floors, keep_all, weights, normalize, lam, out):
    """_combine for exactly two models, one element at a time (the compiler vectorises it)."""
    x0, x1 = x[0], x[1]
    f0, f1 = floors[0], floors[1]
    all0, all1 = keep_all[0], keep_all[1]
    w0, w1 = weights[0], weights[1]
    zero = np.float32(0.0)
    for j in prange(lo, hi):
        b = load(base, j)
        v0 = load(x0, j) - b
        v1 = load(x1, j) - b
        d0 = (v0 if all0 or abs(v0) >= f0 else zero) * w0
        d1 = (v1 if all1 or abs(v1) >= f1 else zero) * w1
        positive = d0 + d1 >= 0
        a0 = d0 > 0 if positive else d0 < 0
        a1 = d1 > 0 if positive else d1 < 0
        merged = (d0 if a0 else zero) + (d1 if a1 else zero)
        if normalize:
            divisor = (w0 if a0 else zero) + (w1 if a1 else zero)
            merged = merged / (divisor if divisor != 0 else np.float32(1.0))
        store(out, j, b + lam * merged)


def available(x: Tensor | Sequence[Tensor], base: Tensor) -> bool:
    """Whether the kernel can run: CPU, contiguous, all bfloat16 or all float32."""
    return usable([*x, base])


def _thresholds(xs: tuple[np.ndarray, ...], base: np.ndarray, keep: list[int | None]
                ) -> tuple[np.ndarray, np.ndarray]:
    """(T_i, cut-off_i) per model: T_i the keep[i]-th largest |xs[i] - base| (None: no trim, T_i = 0).

    Entries equal to T_i are kept before the flat index cut-off_i and dropped
    from it on, so that exactly keep[i] entries are kept, lowest index first
    among ties (cut-off n when every tied entry fits).
    """
    n, models = base.shape[0], len(xs)
    trim = [k is not None and k < n for k in keep]
    thresholds = np.zeros(models, dtype=np.float32)
    cutoffs = np.full(models, n, dtype=np.int64)
    if not any(trim):
        return thresholds, cutoffs
    threads = numba.get_num_threads()
    highs = np.array([-1 if t else -2 for t in trim], dtype=np.int64)
    top = _histograms(xs, base, highs, threads).sum(axis=1, dtype=np.int64)  # (models, buckets)
    above_high = np.zeros(models, dtype=np.int64)
    for i in range(models):
        if trim[i]:
            highs[i], above_high[i] = _select(top[i], keep[i])
    parts = 8 * threads  # the low pass also counts ties per part, to place the cut-offs
    partial = _histograms(xs, base, highs, parts)  # (models, parts, buckets)
    for i in range(models):
        if not trim[i]:
            continue
        low_hist = partial[i].sum(axis=0, dtype=np.int64)
        low, above_low = _select(low_hist, keep[i] - above_high[i])
        bits = np.array([(int(highs[i]) << 16) | int(low)], dtype=np.uint32)
        thresholds[i] = bits.view(np.float32)[0]
        fit = keep[i] - (above_high[i] + above_low)  # entries equal to T_i that fit
        if fit < low_hist[low]:
            ties = np.cumsum(partial[i, :, low], dtype=np.int64)
            part = int(np.searchsorted(ties, fit, side="right"))  # the part where the count passes fit
            before = int(ties[part - 1]) if part > 0 else 0
            step = (n + parts - 1) // parts
            cutoffs[i] = _tie_cutoff(xs[i], base, thresholds[i], part * step, min(n, (part + 1) * step),
                                     fit - before)
    return thresholds, cutoffs


def ties_merge(x: Tensor | Sequence[Tensor], base: Tensor, keep: list[int | None], weights: list[float], *,
               normalize: bool, lam: float, out_dtype: torch.dtype = torch.float32) -> Tensor:
    """TIES of x (N, *shape), or N tensors, on base (*shape); bfloat16 or float32 in, float32 (*shape) out.

    keep[i] is the number of entries of task vector i kept by magnitude (None: all).
    Same result as sparsify.ties on the float32 versions of the inputs;
    out_dtype bfloat16 rounds it as torch's .to(torch.bfloat16) does, in the same pass.
    """
    if base.numel() == 0:
        return torch.empty(base.shape, dtype=out_dtype)
    thresholds, cutoffs = _thresholds(tuple(as_array(row) for row in x), as_array(base), keep)
    out = torch.empty(base.shape, dtype=torch.bfloat16 if out_dtype == torch.bfloat16 else torch.float32)
    ties_combine(x, base, keep, weights, thresholds, cutoffs, normalize=normalize, lam=lam, out=out)
    return out.to(out_dtype)


def ties_combine(x: Tensor | Sequence[Tensor], base: Tensor, keep: list[int | None], weights: list[float],
                 thresholds: np.ndarray, cutoffs: np.ndarray, *, normalize: bool, lam: float, out: Tensor) -> None:
    """The combining pass of ties_merge alone, written into `out` (base's shape, float32 or bfloat16, contiguous).

    For callers that already know each model's threshold T_i (float32) and cut-off (int64), the
    values ties_merge's selection finds: a search keeps them across candidates (search/fastpath.py).
    """
    xs = tuple(as_array(row) for row in x)
    b = as_array(base)
    numel = b.shape[0]
    keep_all = np.array([k is None or k >= numel for k in keep], dtype=np.bool_)
    combine = _combine_pair if len(xs) == 2 else _combine
    w = np.asarray(weights, dtype=np.float32)
    # Between consecutive cutoffs each model's rule is one comparison, |d| >= floor:
    # floor T_i before its cutoff, the next float32 above T_i (i.e. |d| > T_i) after it.
    bounds = sorted({0, numel, *cutoffs.tolist()})
    above = np.nextafter(thresholds, np.float32(np.inf))
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        floors = np.where(lo < cutoffs, thresholds, above).astype(np.float32)
        combine(xs, b, lo, hi, floors, keep_all, w, bool(normalize), np.float32(lam), as_array(out))


# Below this many entries the reference is faster: the kernel's two histogram passes have a
# fixed cost (65536-bin histograms per model and thread) of tens of milliseconds.
MIN_KERNEL_NUMEL = 1 << 17


def supports(xs: Sequence[Tensor], base: Tensor | None, p, s) -> bool:
    """TIES by magnitude on CPU inputs all bfloat16 or all float32 (not the rescaled variant), big enough."""
    return (base is not None and len(xs) > 0 and base.numel() >= MIN_KERNEL_NUMEL
            and not getattr(s, "rescale", False) and available(xs, base))


def run(xs: Sequence[Tensor], base: Tensor, p, s, gen, out_dtype: torch.dtype) -> Tensor:
    """ties (methods/sparsify.py) on the inputs as stored, rounded to out_dtype in the combining pass."""
    from mergelab.methods.sparsify import keep_count

    keeps = [None if q.density >= 1 else keep_count(q.density, base.numel()) for q in p]
    return ties_merge(list(xs), base, keeps, [float(q.weight) for q in p], normalize=s.normalize,
                      lam=s.lambda_, out_dtype=out_dtype)
