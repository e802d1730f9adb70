"""TIES on the CPU in a few streaming passes, compiled with numba, on one thread.

The readable TIES (methods/sparsify.py) runs some thirty tensor operations per
block and needs every input converted to float32 first. Here each pass reads
the inputs in their storage dtype (bfloat16 bits or float32) and does its
arithmetic per element in float32 registers, in loops the compiler vectorises:

    threshold, per model i: the exact k-th largest T_i of |theta_i - theta_base|
        and the flat index from which entries equal to T_i no longer fit
        (kernels/ties_select.py: sampled candidates and exact counting passes;
        or, for a search that merges the same inputs again and again, two reads
        of the task vector's magnitude order, built once: kernels/ties_order.py);
    combine, per element j (elect_pair, elect_many: also the dare/breadcrumbs
        kernels' election), rounded to the output dtype in the same pass:

        v_i    = theta_i[j] - theta_base[j]                       (float32)
        keep_i = |v_i| >= T_i before the cut-off, |v_i| > T_i from it on
        d_i    = (v_i if keep_i else 0) * w_i
        s      = sum_i d_i >= 0                                   (elected sign)
        a_i    = d_i > 0 if s else d_i < 0                        (agrees with it)
        m      = sum_i [a_i] d_i,  Z = sum_i [a_i] w_i
        out[j] = theta_base[j] + lambda * (m / (Z if Z != 0 else 1) if normalize else m)

One thread: a parallel region on the 2-core machines this runs on waits for its
slowest thread, which the engine's prefetch and writer threads (and any other
load) hold up; measured in docs/results-kernels-ties.md.

Entry points: run() (the engine: a new tensor), and for search candidates
prepare() (the magnitude orders, once per search) and into() (written straight
into the model's tensor); see methods/kernels/__init__.py's Kernel.

The numbers are those of sparsify.ties (same float32 operations in the same
order per element: bit for bit on the tests). Inputs are never written.
Yadav et al. 2023, "TIES-Merging", arXiv:2306.01708.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np
import torch
from numba import njit
from torch import Tensor

from mergelab.methods.kernels.io import as_array, load, store, store_dtype, usable
from mergelab.methods.kernels.ties_order import MagnitudeIndex
from mergelab.methods.kernels.ties_select import _thresholds
from mergelab.methods.trim import keep_count

__all__ = ["available", "combine_ranges", "elect_many", "elect_pair", "ties_combine", "ties_merge",
           "supports", "run", "supports_into", "prepare", "into"]

_ZERO, _ONE = np.float32(0.0), np.float32(1.0)
_PAIR_TILE = 4096  # entries per slice of the two-model pass
_TILE = 256  # entries per tile of the many-model pass: every model's slice of a tile stays in L1


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


@njit(nogil=True, cache=True)
def _trimmed(x, base, floor, ceiling, keep_all, weight, d):
    """d[t] = (x[t] - base[t] if it is kept else 0) * weight over one tile (slices of the same width).

    Kept: floor <= |v| (or always, keep_all) and not |v| >= ceiling (NaN: no ceiling; breadcrumbs
    drops its largest entries so).
    """
    for t in range(base.shape[0]):
        v = load(x, t) - load(base, t)
        keep = (keep_all or abs(v) >= floor) and not abs(v) >= ceiling
        d[t] = (v if keep else _ZERO) * weight


# The combining passes run on one thread: they vectorise, so one core streams the inputs at
# memory speed, and a parallel region on this 2-core machine waits for its slowest thread,
# which the engine's prefetch and writer threads (and any other load) often hold up.
@njit(nogil=True, cache=True)
def _combine(x, base, lo, hi, floors, ceilings, keep_all, weights, normalize, lam, out):
    """out[lo:hi] = base + lam * disjoint mean of the trimmed, weighted task vectors (any number of models).

    Tile by tile, each step a loop over the tile's entries (which the compiler vectorises, where one
    loop over the models per entry would not): every model's trimmed d, their sum, then the agreeing
    entries' sum and weights in model order (adding 0 for the others is exact: elect_many's numbers).
    """
    models = len(x)
    d = np.empty((models, _TILE), dtype=np.float32)
    total = np.empty(_TILE, dtype=np.float32)
    merged = np.empty(_TILE, dtype=np.float32)
    divisor = np.empty(_TILE, dtype=np.float32)
    for j0 in range(lo, hi, _TILE):
        j1 = min(hi, j0 + _TILE)
        width, bs = j1 - j0, base[j0:j1]
        for i in range(models):
            _trimmed(x[i][j0:j1], bs, floors[i], ceilings[i], keep_all[i], weights[i], d[i])
        total[:width] = d[0, :width]
        merged[:width] = _ZERO
        divisor[:width] = _ZERO
        for i in range(1, models):
            for t in range(width):
                total[t] += d[i, t]
        for i in range(models):
            di, wi = d[i], weights[i]
            for t in range(width):
                agree = di[t] > _ZERO if total[t] >= _ZERO else di[t] < _ZERO
                merged[t] += di[t] if agree else _ZERO
                divisor[t] += wi if agree else _ZERO
        o = out[j0:j1]
        for t in range(width):
            m = merged[t] / (divisor[t] if divisor[t] != _ZERO else _ONE) if normalize else merged[t]
            store(o, t, load(bs, t) + lam * m)


@njit(nogil=True, cache=True)
def _combine_pair(x, base, lo, hi, floors, ceilings, keep_all, weights, normalize, lam, out):
    """_combine for exactly two models, over slices (the compiler vectorises loops over them)."""
    f0, f1, c0, c1 = floors[0], floors[1], ceilings[0], ceilings[1]
    all0, all1 = keep_all[0], keep_all[1]
    w0, w1 = weights[0], weights[1]
    for j0 in range(lo, hi, _PAIR_TILE):
        j1 = min(hi, j0 + _PAIR_TILE)
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


def combine_ranges(xs: tuple[np.ndarray, ...], base: np.ndarray, floor: tuple[np.ndarray, np.ndarray],
                   ceiling: tuple[np.ndarray, np.ndarray], keep_all: np.ndarray, weights, *, normalize: bool,
                   lam: float, out: np.ndarray) -> None:
    """TIES's combining pass where model i keeps the entries whose |d| ranks inside a band.

    floor = (T, cut-off) per model: |d| > T, or |d| == T at a flat index before the cut-off,
    puts an entry in the kept top (see ties_select._thresholds); keep_all[i] keeps every entry
    instead. ceiling = (T', cut-off') likewise marks a top that is dropped (T' NaN: none).
    Between consecutive cut-offs each bound is one comparison, |d| >= f: f = T before the
    cut-off, the next float32 above T after it (i.e. |d| > T).
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
    values ties_merge's selection finds (into() takes them from the magnitude orders).
    """
    xs = tuple(as_array(row) for row in x)
    numel = base.numel()
    keep_all = np.array([k is None or k >= numel for k in keep], dtype=np.bool_)
    no_ceiling = np.full(len(xs), np.nan, dtype=np.float32)
    combine_ranges(xs, as_array(base), (np.asarray(thresholds, dtype=np.float32), np.asarray(cutoffs, dtype=np.int64)),
                   (no_ceiling, np.full(len(xs), numel)), keep_all, weights, normalize=normalize, lam=lam,
                   out=as_array(out))


# Below this many entries the reference is faster (measured with the earlier histogram selection,
# whose fixed cost was tens of milliseconds; kept, as small tensors are a small share of a model).
MIN_KERNEL_NUMEL = 1 << 17


def _keeps(p, numel: int) -> list[int | None]:
    """Entries kept per model (None: all of them), as sparsify.ties keeps them."""
    return [None if q.density >= 1 else keep_count(q.density, numel) for q in p]


def supports_into(xs: Sequence[Tensor], base: Tensor | None, p, s) -> bool:
    """TIES by magnitude on CPU inputs all bfloat16 or all float32 (not the rescaled variant), any size."""
    return base is not None and len(xs) > 0 and not getattr(s, "rescale", False) and available(xs, base)


def supports(xs: Sequence[Tensor], base: Tensor | None, p, s) -> bool:
    """supports_into, on tensors big enough for the sampled selection to beat the reference."""
    return base is not None and base.numel() >= MIN_KERNEL_NUMEL and supports_into(xs, base, p, s)


def run(xs: Sequence[Tensor], base: Tensor, p, s, gen, out_dtype: torch.dtype) -> Tensor:
    """ties (methods/sparsify.py) on the inputs as stored, rounded to out_dtype in the combining pass."""
    return ties_merge(list(xs), base, _keeps(p, base.numel()), [float(q.weight) for q in p], normalize=s.normalize,
                      lam=s.lambda_, out_dtype=out_dtype)


def prepare(xs: Sequence[Tensor], base: Tensor, p, s, keep: Callable) -> list[MagnitudeIndex | None] | None:
    """The magnitude orders into() needs for p: one per trimmed model (None where every entry is kept).

    keep(i, build, nbytes) -> build() for input i over this base, made once per search (the
    caller's store), or None where its nbytes do not fit the caller's memory budget; then this
    returns None too (run() selects instead).
    """
    n = base.numel()
    if n >= 2**31:
        return None  # flat indices are int32
    orders: list[MagnitudeIndex | None] = []
    for i, k in enumerate(_keeps(p, n)):
        order = None
        if k is not None and k < n:
            order = keep(i, functools.partial(MagnitudeIndex.build, xs[i], base), MagnitudeIndex.nbytes_for(n))
            if order is None:
                return None
        orders.append(order)
    return orders


def into(xs: Sequence[Tensor], base: Tensor, p, s, out: Tensor, state: list[MagnitudeIndex | None] | None = None
         ) -> None:
    """run()'s numbers written into `out` (base's shape, float32 or bfloat16, contiguous CPU, apart from the inputs).

    state: prepare()'s orders for these inputs (then each threshold and cut-off is two reads of
    an order); None: the sampled selection finds them, as run() does.
    """
    n = base.numel()
    if n == 0:
        return
    keeps = _keeps(p, n)
    if state is None:
        thresholds, cutoffs = _thresholds(tuple(as_array(x) for x in xs), as_array(base), keeps)
    else:
        thresholds = np.zeros(len(xs), dtype=np.float32)  # threshold 0, cut-off n: every entry kept
        cutoffs = np.full(len(xs), n, dtype=np.int64)
        for i, (k, order) in enumerate(zip(keeps, state)):
            if order is not None:
                thresholds[i], cutoffs[i] = order.select(k, xs[i], base)
    ties_combine(xs, base, keeps, [float(q.weight) for q in p], thresholds, cutoffs, normalize=s.normalize,
                 lam=s.lambda_, out=out)
