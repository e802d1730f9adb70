"""A task vector's magnitude order, built once, so that TIES's top-k selection for any density is a lookup.

TIES keeps the k = keep_count(density, n) entries of largest |tau|, tau = theta_i - theta_base,
ties at the threshold kept lowest flat index first. The compiled kernel (methods/kernels/ties.py)
finds the exact threshold T = k-th largest |tau| by radix selection on the float32 bit pattern
(which orders like the value for non-negative floats): two histogram passes over the whole
tensor, for every candidate. A search changes the density, never tau, so here the radix
selection's first step is done once and kept:

    index:  the entries' flat indices grouped by the top 16 bits of |tau|'s float32 pattern
            (a counting sort: bucket by bucket, ascending index inside a bucket), and the
            bucket counts accumulated from the largest bucket down;
    lookup: the bucket holding the k-th largest entry is a binary search in those counts;
            the low 16 bits of that bucket's entries alone (a gather of its size, usually a
            small share of n) give T, the number of entries above it, and the flat index
            from which entries equal to T no longer fit (the kernel's tie cut-off).

Memory: 4 bytes per entry (int32 indices) plus 1 MB per tensor, per model.
The results are exactly the kernel's threshold and cut-off (tests/search/test_fastpath.py
compares them with a sort), so its combining pass then gives the merge's numbers bit for bit.
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
def _magnitude_bits(x, base, j):
    return np.float32(abs(load(x, j) - load(base, j))).view(np.uint32)


@njit(parallel=True, cache=True)
def _bucket_counts(x, base, parts):
    """(parts, 65536) counts of the top 16 bits of |x - base|'s float32 pattern, per part of the tensor."""
    n = base.shape[0]
    counts = np.zeros((parts, _BUCKETS), dtype=np.int64)
    step = (n + parts - 1) // parts
    for t in prange(parts):
        for j in range(t * step, min(n, (t + 1) * step)):
            counts[t, _magnitude_bits(x, base, j) >> 16] += 1
    return counts


@njit(parallel=True, cache=True)
def _scatter(x, base, starts, perm):
    """perm[starts[t, h] ...] = the indices of part t whose top bits are h, in ascending order."""
    n = base.shape[0]
    parts = starts.shape[0]
    step = (n + parts - 1) // parts
    for t in prange(parts):
        pos = starts[t].copy()
        for j in range(t * step, min(n, (t + 1) * step)):
            h = _magnitude_bits(x, base, j) >> 16
            perm[pos[h]] = j
            pos[h] += 1


@njit(cache=True)
def _low_bits(x, base, idx):
    out = np.empty(idx.shape[0], dtype=np.int64)
    for m in range(idx.shape[0]):
        out[m] = _magnitude_bits(x, base, idx[m]) & 0xFFFF
    return out


@dataclasses.dataclass
class MagnitudeIndex:
    """Flat indices of |x - base| grouped by the top 16 bits of their float32 patterns (see module docstring)."""

    perm: np.ndarray  # (n,) int32: bucket 0's indices, then bucket 1's, ...; ascending inside a bucket
    offsets: np.ndarray  # (65537,) int64: bucket h holds perm[offsets[h]:offsets[h + 1]]
    from_top: np.ndarray  # (65536,) int64: entries in the i + 1 largest buckets

    @property
    def numel(self) -> int:
        return int(self.perm.shape[0])

    @property
    def nbytes(self) -> int:
        return self.perm.nbytes + self.offsets.nbytes + self.from_top.nbytes

    @staticmethod
    def nbytes_for(numel: int) -> int:
        return 4 * numel + 8 * (2 * _BUCKETS + 1)

    @classmethod
    def build(cls, x: Tensor, base: Tensor) -> MagnitudeIndex:
        """Index |x - base| (contiguous CPU tensors, both float32 or both bfloat16) in two parallel passes."""
        xa, ba = as_array(x), as_array(base)
        if ba.shape[0] >= 2**31:
            raise ValueError("tensors of 2^31 entries or more are not indexed")
        # Parts of at least 2^16 entries each: a part costs a 65536-bucket row of counts.
        parts = max(1, min(8 * numba.get_num_threads(), ba.shape[0] >> 16))
        counts = _bucket_counts(xa, ba, parts)  # (parts, buckets)
        per_bucket = counts.sum(axis=0)
        offsets = np.zeros(_BUCKETS + 1, dtype=np.int64)
        np.cumsum(per_bucket, out=offsets[1:])
        # Part t's entries of bucket h start after the bucket's earlier buckets and earlier parts.
        starts = offsets[:-1] + np.cumsum(counts, axis=0) - counts
        perm = np.empty(ba.shape[0], dtype=np.int32)
        _scatter(xa, ba, starts, perm)
        return cls(perm, offsets, np.cumsum(per_bucket[::-1]))

    def select(self, k: int, x: Tensor, base: Tensor) -> tuple[np.float32, int]:
        """(T, cut-off) for keeping k of the n entries, 1 <= k < n (x, base: the tensors it was built from).

        T is the exact k-th largest |x - base|; entries above T are kept, entries equal to T are
        kept below the flat index cut-off and dropped from it on (n when every tied entry fits),
        so exactly k entries are kept, lowest index first among ties.
        """
        n = self.numel
        if not 1 <= k < n:
            raise ValueError(f"k = {k} is not in [1, {n})")
        i = int(np.searchsorted(self.from_top, k))  # first i with from_top[i] >= k
        bucket = _BUCKETS - 1 - i
        above = int(self.from_top[i - 1]) if i else 0  # entries in larger buckets
        members = self.perm[self.offsets[bucket]:self.offsets[bucket + 1]]  # ascending flat indices
        low = _low_bits(as_array(x), as_array(base), members)
        low_counts = np.bincount(low, minlength=_BUCKETS)
        low_from_top = np.cumsum(low_counts[::-1])
        j = int(np.searchsorted(low_from_top, k - above))
        low_t = _BUCKETS - 1 - j
        above += int(low_from_top[j - 1]) if j else 0  # entries strictly above T
        threshold = np.array([(bucket << 16) | low_t], dtype=np.uint32).view(np.float32)[0]
        fit = k - above  # entries equal to T that are kept
        tied = members[low == low_t]
        cutoff = int(tied[fit]) if fit < tied.shape[0] else n
        return threshold, cutoff
