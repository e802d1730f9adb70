"""TIES's threshold selection on the CPU, compiled with numba: the exact k-th largest |theta_i - theta_base|.

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
        histogram passes took 5x longer).

Inputs are read in their storage dtype (bfloat16 bits or float32), never written. Used by
the TIES kernel (kernels/ties.py) and the breadcrumbs band (kernels/thinned.py).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from mergelab.methods.kernels.io import load

__all__ = ["_thresholds"]


@njit(inline="always")
def _bits(value):
    return np.float32(value).view(np.uint32)


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
