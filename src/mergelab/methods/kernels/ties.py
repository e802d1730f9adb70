"""TIES on the CPU in a few streaming passes, compiled with numba, on one thread.

The readable TIES (methods/sparsify.py) runs some thirty tensor operations per
block and needs every input converted to float32 first. Here each pass reads
the inputs in their storage dtype (bfloat16 bits or float32) and does its
arithmetic per element in float32 registers, in loops the compiler vectorises:

    threshold, per model i: the exact k-th largest T_i of |theta_i - theta_base|
        (_thresholds). A strided sample proposes a few candidate values; one
        pass counts, for every model at once, the entries at or above each
        candidate (and above it), which names the range holding T_i: usually a
        single value, as differences of bfloat16 weights come in masses of tied
        values; else a second counting pass, or a gather of the (few) entries
        in the range, finds it. When only some entries equal to T_i fit in k, a
        scan finds the index from which they are dropped (lowest index first, as
        top_k_mask keeps them). No histogram: its increments on masses of tied
        values wait for each other (an earlier radix selection in two 65536-bin
        histogram passes took 5x longer);
    combine: trim, weight, elect the sign, disjoint mean and add to the base,
        per element (elect_pair, elect_many: also the dare/breadcrumbs kernels'
        election), rounded to the output dtype in the same pass.

One thread: a parallel region on the 2-core machines this runs on waits for its
slowest thread, which the engine's prefetch and writer threads (and any other
load) hold up; measured in docs/results-kernels-ties.md.

The numbers are those of sparsify.ties (same float32 operations in the same
order per element: bit for bit on the tests). Inputs are never written.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from numba import njit
from torch import Tensor

from mergelab.methods.kernels.io import as_array, load, store, store_dtype, usable

__all__ = ["available", "combine_ranges", "elect_many", "elect_pair", "ties_combine", "ties_merge"]


@njit(inline="always")
def _bits(value):
    return np.float32(value).view(np.uint32)


_ZERO, _ONE = np.float32(0.0), np.float32(1.0)


@njit(nogil=True, cache=True)
def elect_pair(d0, d1, w0, w1, normalize):
    """TIES's sign election and disjoint mean of one entry of two weighted task vectors d0, d1.

    The elected sign is + where d0 + d1 >= 0; entries agreeing with it (> 0 there, < 0
    elsewhere: zeros never agree) are summed, and divided by their weights' sum when
    normalize (by 1 where none agrees). consensus.elect_sign and disjoint_mean, per entry,
    in the same float32 operations and order.
    """
    positive = d0 + d1 >= 0
    a0 = d0 > 0 if positive else d0 < 0
    a1 = d1 > 0 if positive else d1 < 0
    merged = (d0 if a0 else _ZERO) + (d1 if a1 else _ZERO)
    if normalize:
        divisor = (w0 if a0 else _ZERO) + (w1 if a1 else _ZERO)
        merged = merged / (divisor if divisor != 0 else _ONE)
    return merged


@njit(nogil=True, cache=True)
def elect_many(d, weights, normalize):
    """elect_pair for N >= 1 weighted entries d (float32 array, one per model), summed in model order."""
    total = d[0]
    for i in range(1, d.shape[0]):
        total += d[i]
    positive = total >= 0
    merged, divisor = _ZERO, _ZERO
    for i in range(d.shape[0]):
        if (d[i] > 0) if positive else (d[i] < 0):
            merged += d[i]
            divisor += weights[i]
    if normalize:
        merged = merged / (divisor if divisor != 0 else _ONE)
    return merged


# The combining passes run on one thread: they vectorise, so one core streams the inputs at
# memory speed, and a parallel region on this 2-core machine waits for its slowest thread,
# which the engine's prefetch and writer threads (and any other load) often hold up.
@njit(nogil=True, cache=True)
def _combine(x, base, lo, hi, floors, ceilings, keep_all, weights, normalize, lam, out):
    """out[lo:hi] = base + lam * disjoint mean of the trimmed, weighted task vectors.

    Entry j of task vector i is kept when floors[i] <= |d| (or always, keep_all[i]) and not
    |d| >= ceilings[i] (NaN: no ceiling; breadcrumbs drops its largest entries so).
    """
    models = len(x)
    d = np.empty(models, dtype=np.float32)
    for j in range(lo, hi):
        b = load(base, j)
        for i in range(models):
            v = load(x[i], j) - b
            keep = (keep_all[i] or abs(v) >= floors[i]) and not abs(v) >= ceilings[i]
            d[i] = (v if keep else _ZERO) * weights[i]
        store(out, j, b + lam * elect_many(d, weights, normalize))


@njit(nogil=True, cache=True)
def _combine_pair(x, base, lo, hi, floors, ceilings, keep_all, weights, normalize, lam, out):
    """_combine for exactly two models, over slices (the compiler vectorises loops over them)."""
    f0, f1, c0, c1 = floors[0], floors[1], ceilings[0], ceilings[1]
    all0, all1 = keep_all[0], keep_all[1]
    w0, w1 = weights[0], weights[1]
    for j0 in range(lo, hi, _SCAN_TILE):
        j1 = min(hi, j0 + _SCAN_TILE)
        x0, x1, bs, o = x[0][j0:j1], x[1][j0:j1], base[j0:j1], out[j0:j1]
        for t in range(j1 - j0):
            b = load(bs, t)
            v0 = load(x0, t) - b
            v1 = load(x1, t) - b
            d0 = (v0 if (all0 or abs(v0) >= f0) and not abs(v0) >= c0 else _ZERO) * w0
            d1 = (v1 if (all1 or abs(v1) >= f1) and not abs(v1) >= c1 else _ZERO) * w1
            store(o, t, b + lam * elect_pair(d0, d1, w0, w1, normalize))


def available(x: Tensor | Sequence[Tensor], base: Tensor) -> bool:
    """Whether the kernel can run: CPU, contiguous, all bfloat16 or all float32."""
    return usable([*x, base])


@njit(nogil=True, cache=True)
def _sample(x, base, step, out):
    """out[s] = float32 bits of |x - base| at entry s * step."""
    for s in range(out.shape[0]):
        out[s] = _bits(abs(load(x, s * step) - load(base, s * step)))


@njit(nogil=True, cache=True)
def _count_at_least(xs, base, rows, points, counts):
    """counts[q, l] += number of entries j with bits(|xs[rows[q]][j] - base[j]|) >= points[q, l].

    One thread, tile by tile: each tile's magnitudes are computed once into an L1 buffer, then
    every point's count is a compare-and-add loop that the compiler vectorises (no branch, no
    scattered increment: a histogram's increments on masses of tied values wait for each other).
    """
    n, cols = base.shape[0], points.shape[1]
    mags = np.empty(_SCAN_TILE, dtype=np.uint32)
    for j0 in range(0, n, _SCAN_TILE):
        width = min(_SCAN_TILE, n - j0)
        b = base[j0:j0 + width]  # slices: the compiler vectorises loops over them, not over j0 + t
        for q in range(rows.shape[0]):
            x = xs[rows[q]][j0:j0 + width]
            for t in range(width):
                mags[t] = _bits(abs(load(x, t) - load(b, t)))
            for l in range(cols):
                p, c = points[q, l], np.int32(0)
                for t in range(width):
                    c += np.int32(mags[t] >= p)
                counts[q, l] += c


@njit(nogil=True, cache=True)
def _gather_between(x, base, lo, hi, out):
    """Bits of the magnitudes with lo <= bits <= hi, in index order, into out (sized to their count).

    Tiles without such an entry (most, when the range is narrow) cost a vectorised count only.
    """
    n, c, span = base.shape[0], 0, hi - lo
    for j0 in range(0, n, _GATHER_TILE):
        j1 = min(n, j0 + _GATHER_TILE)
        xt, bt = x[j0:j1], base[j0:j1]
        hits = np.int32(0)
        for t in range(j1 - j0):
            hits += np.int32(_bits(abs(load(xt, t) - load(bt, t))) - lo <= span)  # unsigned: lo <= v <= hi
        if hits == 0:
            continue
        for t in range(j1 - j0):
            v = _bits(abs(load(xt, t) - load(bt, t)))
            if v - lo <= span:
                out[c] = v
                c += 1


@njit(nogil=True, cache=True)
def _tie_index(x, base, value, skip):
    """Flat index of the (skip + 1)-th entry whose magnitude bits equal value (n if there are fewer).

    Counts tile by tile (vectorised) and walks entry by entry only in the tile where it lies.
    """
    n, seen = base.shape[0], 0
    for j0 in range(0, n, _SCAN_TILE):
        j1 = min(n, j0 + _SCAN_TILE)
        xt, bt = x[j0:j1], base[j0:j1]
        c = np.int32(0)
        for t in range(j1 - j0):
            c += np.int32(_bits(abs(load(xt, t) - load(bt, t))) == value)
        if seen + c > skip:
            for t in range(j1 - j0):
                if _bits(abs(load(xt, t) - load(bt, t))) == value:
                    if seen == skip:
                        return j0 + t
                    seen += 1
        seen += c
    return n


_SAMPLE = 1 << 15  # entries sampled per model to place the candidate thresholds
_SCAN_TILE = 4096
_GATHER_TILE = 512
_NEAR = 4  # candidate values per model: those the sample makes likeliest to be the k-th largest
_REFINE = 8  # candidate values of the second counting pass
_TOP = (1 << 32) - 1


class _Estimate:
    """Where a strided sample puts the k-th largest magnitude of one model: candidates to count.

    The sample takes every step-th entry (an odd step, so that every column of a
    row-major matrix is visited), sorted by float32 bit pattern (which orders like
    the value for non-negative floats). The k-th largest sits near the sample's
    position pos = m (1 - k/n), within a binomial standard deviation sd.
    """

    def __init__(self, x: np.ndarray, base: np.ndarray, k: int):
        n = base.shape[0]
        step = max(1, n // _SAMPLE) | 1
        m = (n - 1) // step + 1
        self.sample = np.empty(m, dtype=np.uint32)
        _sample(x, base, step, self.sample)
        self.sample.sort()
        self.pos = m - k * m / n
        quantile = min(1.0, max(0.0, self.pos / m))
        self.sd = math.sqrt(max(quantile * (1 - quantile), 1.0 / m) / m) * m

    def at(self, position: float) -> int:
        return int(self.sample[min(self.sample.size - 1, max(0, int(position)))])

    def likeliest(self, lo: int, hi: int, limit: int, *, tied: bool = False) -> np.ndarray:
        """Up to `limit` sample values in [lo, hi], likeliest first to be the k-th largest (tied: seen twice or more).

        Value v fills sample positions [start, end); its weight is the chance that a normal
        error of sd around pos lands there. On data with masses of tied values (differences
        of bfloat16 weights) the k-th largest is usually one of the heavy values.
        """
        s = self.sample
        first, last = np.searchsorted(s, lo, side="left"), np.searchsorted(s, hi, side="right")
        window = np.unique(s[max(first, int(self.pos - 3 * self.sd - 1)):min(last, int(self.pos + 3 * self.sd + 2))])
        if window.size == 0:
            window = np.unique(s[first:last])
        start = np.searchsorted(s, window, side="left").tolist()
        end = np.searchsorted(s, window, side="right").tolist()
        scale = self.sd * math.sqrt(2)
        score = [math.erf((e - self.pos) / scale) - math.erf((b - self.pos) / scale) for b, e in zip(start, end)]
        if tied:
            window = window[np.subtract(end, start) >= 2]
            score = [v for v, b, e in zip(score, start, end) if e - b >= 2]
        return window[np.argsort(score, kind="stable")[::-1][:limit]].astype(np.int64)


def _cut_points(values: np.ndarray, guards: list[int], known: dict[int, int]) -> list[int]:
    """Cut points still to count: v and v + 1 for each candidate value v, and the guards."""
    cuts = {int(c) for c in (*values.tolist(), *(values + 1).tolist(), *guards)}
    return sorted(c for c in cuts if 0 < c <= _TOP and c not in known)


def _count(xs, base, rows: list[int], cuts: list[list[int]], known: list[dict[int, int]]) -> None:
    """known[q][c] = number of entries of model rows[q] with magnitude bits >= c, for c in cuts[q]; one pass."""
    points = np.zeros((len(rows), max(1, max(len(c) for c in cuts))), dtype=np.uint32)  # padding: unused
    for q, c in enumerate(cuts):
        points[q, :len(c)] = c
    counts = np.zeros(points.shape, dtype=np.int64)
    _count_at_least(xs, base, np.array(rows, dtype=np.int64), points, counts)
    for q, c in enumerate(cuts):
        known[q].update(zip(c, counts[q, :len(c)].tolist()))


def _range(known: dict[int, int], k: int) -> tuple[int, int, int, int]:
    """(lo, hi, entries >= lo, entries > hi): the range of bit patterns between known cuts holding rank k."""
    edges = sorted(known)
    a = next(a for a in range(len(edges) - 1) if known[edges[a + 1]] < k <= known[edges[a]])
    return edges[a], edges[a + 1] - 1, known[edges[a]], known[edges[a + 1]]


def _thresholds(xs: tuple[np.ndarray, ...], base: np.ndarray, keep: list[int | None]
                ) -> tuple[np.ndarray, np.ndarray]:
    """(T_i, cut-off_i) per model: T_i the keep[i]-th largest |xs[i] - base| (None: no trim, T_i = 0).

    Entries equal to T_i are kept before the flat index cut-off_i and dropped
    from it on, so that exactly keep[i] entries are kept, lowest index first
    among ties (cut-off n when every tied entry fits).

    Magnitudes are compared as float32 bit patterns. A sample proposes a few
    candidate values per model (_Estimate), and guards four standard deviations
    out; one pass over the inputs counts, for every model at once, the entries at
    or above each candidate v and v + 1 (so v's own count is known). These exact
    counts name the one range of bit patterns that holds T_i and how many entries
    it holds: a range of one value is T_i itself (the usual case on bfloat16
    weights, with their masses of tied values). Otherwise one more counting pass
    tries the tied values the sample saw inside that range, and if the range still holds
    several values, a last pass gathers its entries (few, when the sample was
    representative) and T_i is selected among them. Ties past k: a scan finds
    the cut-off. Exact whatever the sample; only the time depends on it.
    """
    n, models = base.shape[0], len(xs)
    thresholds = np.zeros(models, dtype=np.float32)
    cutoffs = np.full(models, n, dtype=np.int64)
    requests = [i for i in range(models) if keep[i] is not None and keep[i] < n]
    if not requests:
        return thresholds, cutoffs
    estimates = [_Estimate(xs[i], base, keep[i]) for i in requests]
    known = [{0: n, _TOP + 1: 0} for _ in requests]
    cuts = [_cut_points(e.likeliest(0, _TOP, _NEAR), [e.at(e.pos - 4 * e.sd - 2), e.at(e.pos + 4 * e.sd + 2) + 1],
                        {}) for e in estimates]
    _count(xs, base, requests, cuts, known)
    refine = []  # second round: the sample's values inside the range found
    for q, i in enumerate(requests):
        lo, hi, _, _ = _range(known[q], keep[i])
        if lo < hi:
            c = _cut_points(estimates[q].likeliest(lo, hi, _REFINE, tied=True), [], known[q])
            if c:
                refine.append((q, c))
    if refine:
        _count(xs, base, [requests[q] for q, _ in refine], [c for _, c in refine], [known[q] for q, _ in refine])
    for q, i in enumerate(requests):
        k = keep[i]
        lo, hi, at_least, greater = _range(known[q], k)
        if lo == hi:
            value, tied = lo, at_least - greater
        else:
            gathered = np.empty(at_least - greater, dtype=np.uint32)
            _gather_between(xs[i], base, np.uint32(lo), np.uint32(hi), gathered)
            rank = k - greater  # T_i is the rank-th largest gathered value
            value = int(np.partition(gathered, gathered.size - rank)[gathered.size - rank])
            greater += int(np.count_nonzero(gathered > value))
            tied = int(np.count_nonzero(gathered == value))
        thresholds[i] = np.uint32(value).view(np.float32)
        fit = k - greater  # entries equal to T_i that are kept, 1 <= fit <= tied
        if fit < tied:
            cutoffs[i] = _tie_index(xs[i], base, np.uint32(value), fit)
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
    out = torch.empty(base.shape, dtype=store_dtype(out_dtype))
    ties_combine(x, base, keep, weights, thresholds, cutoffs, normalize=normalize, lam=lam, out=out)
    return out.to(out_dtype)


def ties_combine(x: Tensor | Sequence[Tensor], base: Tensor, keep: list[int | None], weights: list[float],
                 thresholds: np.ndarray, cutoffs: np.ndarray, *, normalize: bool, lam: float, out: Tensor) -> None:
    """The combining pass of ties_merge alone, written into `out` (base's shape, float32 or bfloat16, contiguous).

    For callers that already know each model's threshold T_i (float32) and cut-off (int64), the
    values ties_merge's selection finds: a search keeps them across candidates (search/fastpath.py).
    """
    xs = tuple(as_array(row) for row in x)
    numel = base.numel()
    keep_all = np.array([k is None or k >= numel for k in keep], dtype=np.bool_)
    no_ceiling = np.full(len(xs), np.nan, dtype=np.float32)
    combine_ranges(xs, as_array(base), (thresholds, cutoffs), (no_ceiling, np.full(len(xs), numel)), keep_all,
                   weights, normalize=normalize, lam=lam, out=as_array(out))


def combine_ranges(xs: tuple[np.ndarray, ...], base: np.ndarray, floor: tuple[np.ndarray, np.ndarray],
                   ceiling: tuple[np.ndarray, np.ndarray], keep_all: np.ndarray, weights, *, normalize: bool,
                   lam: float, out: np.ndarray) -> None:
    """TIES's combining pass where model i keeps the entries whose |d| ranks inside a band.

    floor = (T, cut-off) per model: |d| > T, or |d| == T at a flat index before the cut-off,
    puts an entry in the kept top (see _thresholds); keep_all[i] keeps every entry instead.
    ceiling = (T', cut-off') likewise marks a top that is dropped (T' NaN: none). Between
    consecutive cut-offs each bound is one comparison, |d| >= f: f = T before the cut-off,
    the next float32 above T after it (i.e. |d| > T).
    """
    numel = base.shape[0]
    w = np.asarray(weights, dtype=np.float32)
    combine = _combine_pair if len(xs) == 2 else _combine
    (t_low, c_low), (t_high, c_high) = floor, ceiling
    t_low, t_high = np.asarray(t_low, dtype=np.float32), np.asarray(t_high, dtype=np.float32)
    bounds = sorted({0, numel, *c_low.tolist(), *c_high.tolist()})
    above_low = np.nextafter(t_low, np.float32(np.inf))
    above_high = np.nextafter(t_high, np.float32(np.inf))
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if lo >= hi:
            continue
        floors = np.where(lo < c_low, t_low, above_low).astype(np.float32)
        ceilings = np.where(lo < c_high, t_high, above_high).astype(np.float32)
        combine(xs, base, lo, hi, floors, ceilings, keep_all, w, bool(normalize), np.float32(lam), out)


# Below this many entries the reference is faster (measured with the earlier histogram selection,
# whose fixed cost was tens of milliseconds; kept, as small tensors are a small share of a model).
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
