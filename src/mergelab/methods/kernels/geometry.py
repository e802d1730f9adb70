"""The geometry of one tensor name in one compiled pass (numba, CPU): what `tensor_geometry` computes.

`tensor_geometry` (geometry.py) is the readable reference: it stacks the N
weights in float32, subtracts the reference and makes a pass per statistic
(two Gram matrices, two sign-conflict counts, the L1 masses), about a dozen
full-size temporaries. These kernels read each model's tensor as stored
(bfloat16 bits or float32, through methods/kernels/io.py), element by element,
and accumulate the same sums in float64:

    weight_gram[i, k] += w_i w_k          task_gram[i, k] += tau_i tau_k
    ref_sq += r^2                         mass_total[i] += |tau_i|
    nonzero count m of (tau_1..tau_N); a conflict when m >= 2 and both signs occur;
    the same after the trim, which keeps tau_i where |tau_i| >= threshold_i.

tau_i = w_i - r is formed in float32, r the base or the models' float32 mean, as
the reference does, so exact zeros (and hence the sign counts) are the same.
The tensor is cut into blocks of fixed size; each block writes its own row of
partial sums, added up in block order afterwards, so the result does not depend
on how many threads ran the blocks (the kernels release the GIL).

Two models (the common case: two fine-tunes and their base) take a kernel
written out for the pair whose loop body has no branch: the sign tests are read
off the float64 product tau_0 tau_1 (exact for float32 factors: < 0 opposite
signs, != 0 both nonzero), so LLVM vectorises it. Other N take the general loop.

Two small gathers serve the other statistics without a float32 copy of the
tensors: `sample_magnitudes` (|tau_i| at the seeded sample positions of
geometry.magnitude_profile) and `subgrid_deltas` (tau_i on the even sub-grid of
geometry.spectral_overlap).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any

import numpy as np
import torch
from numba import njit
from torch import Tensor

from mergelab.methods.kernels.io import KERNEL_DTYPES, as_array, load

BLOCK = 1 << 20  # elements per block of partial sums; fixed, so sums do not depend on the thread count

_FAST = {"reassoc", "contract"}  # sums may be reordered (vectorised); NaN and Inf keep their meaning


@njit(cache=True, nogil=True)
def _many_block(xs, ref, threshold, lo, hi, gram_w, gram_t, acc, hist, conflicts):
    """Any N, elements lo:hi: gram_w/gram_t (N, N) lower triangles, acc (1 + N,) ref_sq then masses,
    hist (2, N + 1) coordinates by nonzero count and conflicts (2,), before and after the trim."""
    n = len(xs)
    w = np.empty(n, np.float32)
    d = np.empty(n, np.float32)
    for j in range(lo, hi):
        total = np.float32(0.0)
        for i in range(n):
            w[i] = load(xs[i], j)
            total += w[i]
        r = total / np.float32(n) if ref is None else load(ref, j)
        acc[0] += np.float64(r) * np.float64(r)
        m = 0
        pos = False
        neg = False
        mt = 0
        pos_t = False
        neg_t = False
        for i in range(n):
            d[i] = w[i] - r
            acc[1 + i] += abs(np.float64(d[i]))
            if d[i] != 0:
                m += 1
                pos |= d[i] > 0
                neg |= d[i] < 0
                if abs(d[i]) >= threshold[i]:
                    mt += 1
                    pos_t |= d[i] > 0
                    neg_t |= d[i] < 0
            for k in range(i + 1):
                gram_w[i, k] += np.float64(w[i]) * np.float64(w[k])
                gram_t[i, k] += np.float64(d[i]) * np.float64(d[k])
        hist[0, m] += 1
        hist[1, mt] += 1
        if m >= 2 and pos and neg:
            conflicts[0] += 1
        if mt >= 2 and pos_t and neg_t:
            conflicts[1] += 1


@njit(cache=True, nogil=True, fastmath=_FAST)
def _pair_block(x0, x1, ref, t0, t1, lo, hi, acc):
    """Two models, elements lo:hi: the same sums as _many_block with a branch-free body.

    acc (13,) float64: weight gram 00 01 11, task gram 00 01 11, ref_sq, mass 0 1, then counts:
    contested, conflicts, trimmed contested, trimmed conflicts (with N = 2 every contested
    coordinate has m = 2, so the chance count is contested / 2).
    """
    g00 = g01 = g11 = s00 = s01 = s11 = rs = m0 = m1 = 0.0
    both = conf = tboth = tconf = 0
    for j in range(lo, hi):
        a = load(x0, j)
        b = load(x1, j)
        r = (a + b) / np.float32(2) if ref is None else load(ref, j)
        da = np.float64(a - r)
        db = np.float64(b - r)
        a64 = np.float64(a)
        b64 = np.float64(b)
        g00 += a64 * a64
        g01 += a64 * b64
        g11 += b64 * b64
        p = da * db  # exact: float32 factors; its sign is the sign agreement, its zero a zero factor
        s00 += da * da
        s01 += p
        s11 += db * db
        rs += np.float64(r) * np.float64(r)
        m0 += abs(da)
        m1 += abs(db)
        contested = np.int64(p != 0.0)
        opposite = np.int64(p < 0.0)
        kept = contested * np.int64(abs(da) >= t0) * np.int64(abs(db) >= t1)
        both += contested
        conf += opposite
        tboth += kept
        tconf += kept * opposite
    acc[0] += g00
    acc[1] += g01
    acc[2] += g11
    acc[3] += s00
    acc[4] += s01
    acc[5] += s11
    acc[6] += rs
    acc[7] += m0
    acc[8] += m1
    acc[9] += both
    acc[10] += conf
    acc[11] += tboth
    acc[12] += tconf


@njit(cache=True, nogil=True)
def _reference_at(xs, ref, j):
    """Entry j of the reference: the base's, or the float32 mean of the models' when there is no base."""
    if ref is None:
        total = np.float32(0.0)
        for i in range(len(xs)):
            total += load(xs[i], j)
        return total / np.float32(len(xs))
    return load(ref, j)


@njit(cache=True, nogil=True)
def _sample_magnitudes(xs, ref, index, out):
    """out[i, s] = |w_i[index[s]] - r[index[s]]| in float32, r the base or the float32 mean."""
    n = len(xs)
    for s in range(index.shape[0]):
        j = index[s]
        r = _reference_at(xs, ref, j)
        for i in range(n):
            out[i, s] = abs(load(xs[i], j) - r)


@njit(cache=True, nogil=True)
def _subgrid_deltas(xs, ref, width, rows, cols, out):
    """out[i, a, b] = w_i[rows[a], cols[b]] - r[rows[a], cols[b]] in float32 (row-major, `width` columns)."""
    n = len(xs)
    for a in range(rows.shape[0]):
        base = rows[a] * width
        for b in range(cols.shape[0]):
            j = base + cols[b]
            r = _reference_at(xs, ref, j)
            for i in range(n):
                out[i, a, b] = load(xs[i], j) - r


def _flat(t: Tensor, dtype: torch.dtype) -> np.ndarray:
    t = t.reshape(-1)
    if t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous():
        t = t.to(device="cpu", dtype=dtype).contiguous()
    return as_array(t)


def stored_arrays(weights: Sequence[Tensor], reference: Tensor | None) -> tuple[tuple[np.ndarray, ...], Any]:
    """(xs, ref): flat numpy views of the tensors as stored (bfloat16 bits or float32).

    Views, not copies, when every model tensor is bfloat16, or every one float32, on the CPU and
    contiguous; otherwise (a mix, float16, float64) float32 copies. Without a reference, `ref`
    is None: the kernels then use the models' mean, and numba compiles that case apart (a None
    argument prunes its branch), so neither loop tests for a reference per element.
    """
    dtypes = {t.dtype for t in weights}
    dtype = dtypes.pop() if len(dtypes) == 1 and weights[0].dtype in KERNEL_DTYPES else torch.float32
    xs = tuple(_flat(t, dtype) for t in weights)
    if reference is None:
        return xs, None
    return xs, _flat(reference, reference.dtype if reference.dtype in KERNEL_DTYPES else torch.float32)


def _run(tasks: list[Callable[[], None]], pool: Executor | None) -> None:
    if pool is None or len(tasks) == 1:
        for task in tasks:
            task()
    else:
        for future in [pool.submit(task) for task in tasks]:
            future.result()


def _pair_pass(xs, ref, threshold: np.ndarray, pool: Executor | None) -> dict:
    n_el = xs[0].shape[0]
    starts = range(0, n_el, BLOCK)
    parts = np.zeros((len(starts), 13))  # float64 partial sums per block, added up in block order
    t0, t1 = np.float32(threshold[0]), np.float32(threshold[1])

    def block(k: int) -> Callable[[], None]:
        return lambda: _pair_block(xs[0], xs[1], ref, t0, t1, starts[k], min(starts[k] + BLOCK, n_el),
                                   parts[k])

    _run([block(k) for k in range(len(starts))], pool)
    acc = parts.sum(axis=0)
    gram_w = np.array([[acc[0], acc[1]], [acc[1], acc[2]]])
    gram_t = np.array([[acc[3], acc[4]], [acc[4], acc[5]]])
    return {"weight_gram": gram_w, "task_gram": gram_t, "ref_sq": float(acc[6]), "mass_total": acc[7:9].copy(),
            "conflicts": [int(acc[10]), int(acc[9]), acc[9] / 2], "trimmed": [int(acc[12]), int(acc[11]), acc[11] / 2]}


def _many_pass(xs, ref, threshold: np.ndarray, pool: Executor | None) -> dict:
    n, n_el = len(xs), xs[0].shape[0]
    starts = range(0, n_el, BLOCK)
    blocks = len(starts)
    gram_w, gram_t = np.zeros((blocks, n, n)), np.zeros((blocks, n, n))
    acc, hist = np.zeros((blocks, 1 + n)), np.zeros((blocks, 2, n + 1), np.int64)
    conflicts = np.zeros((blocks, 2), np.int64)
    thr = threshold.astype(np.float32)

    def block(k: int) -> Callable[[], None]:
        return lambda: _many_block(xs, ref, thr, starts[k], min(starts[k] + BLOCK, n_el), gram_w[k],
                                   gram_t[k], acc[k], hist[k], conflicts[k])

    _run([block(k) for k in range(blocks)], pool)
    chance_of = np.array([0.0, 0.0, *(1 - 2.0 ** (1 - m) for m in range(2, n + 1))])
    hist_sum, conflict_sum = hist.sum(axis=0), conflicts.sum(axis=0)  # (2, N + 1), (2,)

    def symmetric(g: np.ndarray) -> np.ndarray:
        g = g.sum(axis=0)
        return np.tril(g) + np.tril(g, -1).T

    def counts(row: int) -> list[float]:
        return [int(conflict_sum[row]), int(hist_sum[row, 2:].sum()), float(hist_sum[row, 2:] @ chance_of[2:])]

    total = acc.sum(axis=0)
    return {"weight_gram": symmetric(gram_w), "task_gram": symmetric(gram_t), "ref_sq": float(total[0]),
            "mass_total": total[1:], "conflicts": counts(0), "trimmed": counts(1)}


def geometry_pass(weights: Sequence[Tensor], reference: Tensor | None, threshold: Tensor,
                  pool: Executor | None = None) -> dict[str, np.ndarray]:
    """The sums of one tensor name, read in place from the stored tensors.

    Args:
        weights: N tensors of one shape; bfloat16 or float32 are read as stored (other
            dtypes, or a mix, are converted to float32 first).
        reference: the base tensor, or None for the models' mean.
        threshold: (N,) trim thresholds (geometry.magnitude_profile).
        pool: threads to run the blocks on (None: this thread); the sums are the same either way.

    Returns:
        weight_gram, task_gram (N, N) float64 symmetric; ref_sq float; mass_total (N,);
        conflicts, trimmed: [conflicts, contested, chance] before and after the trim.
    """
    xs, ref = stored_arrays(weights, reference)
    thr = threshold.numpy() if isinstance(threshold, Tensor) else np.asarray(threshold)
    if len(xs) == 2:
        return _pair_pass(xs, ref, thr, pool)
    return _many_pass(xs, ref, thr, pool)


def sample_magnitudes(weights: Sequence[Tensor], reference: Tensor | None, index: np.ndarray) -> np.ndarray:
    """(N, len(index)) float32 |tau_i| at the flat positions `index`, read from the tensors as stored."""
    xs, ref = stored_arrays(weights, reference)
    out = np.empty((len(xs), index.shape[0]), np.float32)
    _sample_magnitudes(xs, ref, index, out)
    return out


def subgrid_deltas(weights: Sequence[Tensor], reference: Tensor | None, rows: np.ndarray,
                   cols: np.ndarray) -> np.ndarray:
    """(N, len(rows), len(cols)) float32 tau_i on the sub-grid rows x cols of 2-D tensors, read as stored."""
    xs, ref = stored_arrays(weights, reference)
    out = np.empty((len(xs), rows.shape[0], cols.shape[0]), np.float32)
    _subgrid_deltas(xs, ref, weights[0].shape[1], rows, cols, out)
    return out
