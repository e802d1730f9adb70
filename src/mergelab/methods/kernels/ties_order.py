"""A task vector's magnitude order, built once per search (the TIES kernel's prepare), so that TIES's
top-k selection for any density is a lookup.

TIES keeps the k = keep_count(density, n) entries of largest |tau|, tau = theta_i - theta_base
(float32), ties at the threshold kept lowest flat index first: the entries ranked by the total
order (|tau| descending, flat index ascending). A search changes the density, never tau, so
that order is computed once per task vector and kept as a permutation:

    order[r] = flat index of the entry of rank r (r = 0: the largest |tau|)

Then for any k (1 <= k < n) the kernel's threshold and tie cut-off are two reads:

    T      = |tau[order[k - 1]]|                      the k-th largest magnitude
    cutoff = order[k] if |tau[order[k]]| == T else n  the first tied entry that no longer fits

(entries above T are kept; entries equal to T are kept below the flat index cut-off).

Build: a stable sort of 32-bit keys. |tau|'s float32 pattern orders like its value (it is
non-negative), so key = ~bits sorts descending magnitude ascending. A counting sort on the
key's top 16 bits (two parallel passes: counts per part of the tensor, then a scatter that keeps
ascending flat indices inside a bucket, writing each entry's low 16 bits beside it), then a
stable sort of each bucket by those low bits: skipped where they are all equal, a counting
sort for big buckets (a bfloat16 task vector's differences have few significant bits, so a
few hundred values hold millions of entries each), a merge sort for the others.

Memory: 4 bytes per entry (int32) per task vector, plus 2 bytes per entry while building.
Tested against a full stable sort for every k (tests/methods/test_ties_order.py).
"""

from __future__ import annotations

import dataclasses

import numba
import numpy as np
from numba import njit, prange
from torch import Tensor

from mergelab.methods.kernels.io import as_array, load

_BUCKETS = 1 << 16


@njit(inline="always")
def _key(x, base, j):
    """~(float32 pattern of |x[j] - base[j]|): ascending key = descending magnitude."""
    return ~np.float32(abs(load(x, j) - load(base, j))).view(np.uint32)


@njit(parallel=True, cache=True)
def _bucket_counts(x, base, parts):
    """(parts, 65536) counts of the keys' top 16 bits, per part of the tensor."""
    n = base.shape[0]
    counts = np.zeros((parts, _BUCKETS), dtype=np.int64)
    step = (n + parts - 1) // parts
    for t in prange(parts):
        for j in range(t * step, min(n, (t + 1) * step)):
            counts[t, _key(x, base, j) >> 16] += 1
    return counts


@njit(parallel=True, cache=True)
def _scatter(x, base, starts, order, low):
    """order[starts[t, h]...] = part t's indices whose key has top bits h (ascending); low: their low 16 bits."""
    n = base.shape[0]
    parts = starts.shape[0]
    step = (n + parts - 1) // parts
    for t in prange(parts):
        pos = starts[t].copy()
        for j in range(t * step, min(n, (t + 1) * step)):
            key = _key(x, base, j)
            h = key >> 16
            order[pos[h]] = j
            low[pos[h]] = key & 0xFFFF
            pos[h] += 1


@njit(cache=True)
def _counting_sort(order, low):
    """Stable counting sort of order by low (one bucket's slices), in place."""
    counts = np.zeros(_BUCKETS + 1, dtype=np.int64)
    for m in range(low.shape[0]):
        counts[np.int64(low[m]) + 1] += 1
    for h in range(_BUCKETS):
        counts[h + 1] += counts[h]
    src = order.copy()
    for m in range(low.shape[0]):
        h = np.int64(low[m])
        order[counts[h]] = src[m]
        counts[h] += 1


@njit(parallel=True, cache=True)
def _sort_buckets(offsets, order, low):
    """Each bucket's entries stably sorted by their low 16 bits (indices stay ascending among equal keys)."""
    for h in prange(offsets.shape[0] - 1):
        lo, hi = offsets[h], offsets[h + 1]
        if hi - lo < 2:
            continue
        first = low[lo]
        uniform = True
        for m in range(lo + 1, hi):
            if low[m] != first:
                uniform = False
                break
        if uniform:
            continue
        if hi - lo >= _BUCKETS:  # big buckets (masses of tied bfloat16 differences): linear time
            _counting_sort(order[lo:hi], low[lo:hi])
        else:
            perm = np.argsort(low[lo:hi], kind="mergesort")  # stable
            order[lo:hi] = order[lo:hi][perm]


@njit(cache=True)
def _magnitude_at(x, base, j):
    return abs(load(x, j) - load(base, j))


@dataclasses.dataclass
class MagnitudeIndex:
    """The flat indices of |x - base| in TIES's keeping order (see module docstring)."""

    order: np.ndarray  # (n,) int32: rank -> flat index, |x - base| descending, index ascending among equals

    @property
    def numel(self) -> int:
        return int(self.order.shape[0])

    @property
    def nbytes(self) -> int:
        return self.order.nbytes

    @staticmethod
    def nbytes_for(numel: int) -> int:
        return 4 * numel

    @classmethod
    def build(cls, x: Tensor, base: Tensor) -> MagnitudeIndex:
        """Order |x - base| (contiguous CPU tensors, both float32 or both bfloat16)."""
        xa, ba = as_array(x), as_array(base)
        n = ba.shape[0]
        if n >= 2**31:
            raise ValueError("tensors of 2^31 entries or more are not indexed")
        # Parts of at least 2^16 entries each: a part costs a 65536-bucket row of counts.
        parts = max(1, min(8 * numba.get_num_threads(), n >> 16))
        counts = _bucket_counts(xa, ba, parts)  # (parts, buckets)
        offsets = np.zeros(_BUCKETS + 1, dtype=np.int64)
        np.cumsum(counts.sum(axis=0), out=offsets[1:])
        # Part t's entries of bucket h start after the earlier buckets' entries and the earlier parts'.
        starts = offsets[:-1] + np.cumsum(counts, axis=0) - counts
        order = np.empty(n, dtype=np.int32)
        low = np.empty(n, dtype=np.uint16)
        _scatter(xa, ba, starts, order, low)
        _sort_buckets(offsets, order, low)
        return cls(order)

    def select(self, k: int, x: Tensor, base: Tensor) -> tuple[np.float32, int]:
        """(T, cut-off) for keeping k of the n entries, 1 <= k < n (x, base: the tensors it was built from).

        T is the exact k-th largest |x - base|; entries above T are kept, entries equal to T are
        kept below the flat index cut-off and dropped from it on (n when every tied entry fits),
        so exactly k entries are kept, lowest index first among ties.
        """
        n = self.numel
        if not 1 <= k < n:
            raise ValueError(f"k = {k} is not in [1, {n})")
        xa, ba = as_array(x), as_array(base)
        threshold = np.float32(_magnitude_at(xa, ba, self.order[k - 1]))
        following = int(self.order[k])
        cutoff = following if _magnitude_at(xa, ba, following) == threshold else n
        return threshold, cutoff
