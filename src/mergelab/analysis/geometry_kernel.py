"""The geometry of one tensor name in one compiled pass (numba, CPU): what `tensor_geometry` computes.

`tensor_geometry` (geometry.py) is the readable reference: it stacks the N
weights in float32, subtracts the reference and makes a pass per statistic
(two Gram matrices, two sign-conflict counts, the L1 masses), about a dozen
full-size temporaries. This kernel reads each model's tensor as stored
(bfloat16 bits or float32, through methods/kernels/io.py) once, element by
element, and accumulates the same sums in float64:

    weight_gram[i, k] += w_i w_k          task_gram[i, k] += tau_i tau_k
    ref_sq += r^2                         mass_total[i] += |tau_i|
    nonzero count m of (tau_1..tau_N); a conflict when m >= 2 and both signs occur;
    the same after the trim, which keeps tau_i where |tau_i| >= threshold_i.

tau_i = w_i - r is formed in float32, r the base or the models' float32 mean, as
the reference does, so exact zeros (and hence the sign counts) are the same.
Each block of the tensor writes its own row of partial sums, added up in block
order afterwards, so the result does not depend on the thread count. Two models
(the common case: two fine-tunes and their base) take a kernel written out for
the pair, with no per-model loop, whose blocks run on torch's thread count
(the kernel releases the GIL); other N take the general loop, one thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from numba import njit
from torch import Tensor

from mergelab.methods.kernels.io import KERNEL_DTYPES, as_array, load

_BLOCK = 1 << 16


@njit(cache=True, nogil=True)
def _geometry_pass(xs, ref, has_ref, threshold, gram_w, gram_t, ref_sq, mass, hist, conflicts):
    """Per block b: gram_w/gram_t (B, N, N), ref_sq (B,), mass (B, N), hist (B, 2, N + 1), conflicts (B, 2)."""
    n_el = xs[0].shape[0]
    n = len(xs)
    for b in range(gram_w.shape[0]):
        w = np.empty(n, np.float32)
        d = np.empty(n, np.float32)
        gw = np.zeros((n, n))
        gt = np.zeros((n, n))
        ms = np.zeros(n)
        hs = np.zeros((2, n + 1), np.int64)
        cf = np.zeros(2, np.int64)
        rs = 0.0
        for j in range(b * _BLOCK, min(n_el, (b + 1) * _BLOCK)):
            total = np.float32(0.0)
            for i in range(n):
                w[i] = load(xs[i], j)
                total += w[i]
            r = load(ref, j) if has_ref else total / np.float32(n)
            rs += np.float64(r) * np.float64(r)
            m = 0
            pos = False
            neg = False
            mt = 0
            pos_t = False
            neg_t = False
            for i in range(n):
                d[i] = w[i] - r
                ms[i] += abs(d[i])
                if d[i] != 0:
                    m += 1
                    pos |= d[i] > 0
                    neg |= d[i] < 0
                    if abs(d[i]) >= threshold[i]:
                        mt += 1
                        pos_t |= d[i] > 0
                        neg_t |= d[i] < 0
                for k in range(i + 1):
                    gw[i, k] += np.float64(w[i]) * np.float64(w[k])
                    gt[i, k] += np.float64(d[i]) * np.float64(d[k])
            hs[0, m] += 1
            hs[1, mt] += 1
            if m >= 2 and pos and neg:
                cf[0] += 1
            if mt >= 2 and pos_t and neg_t:
                cf[1] += 1
        gram_w[b] = gw
        gram_t[b] = gt
        ref_sq[b] = rs
        mass[b] = ms
        hist[b] = hs
        conflicts[b] = cf


_FAST = {"reassoc", "contract"}  # sums may be reordered (vectorised); NaN and Inf keep their meaning


@njit(cache=True, nogil=True, fastmath=_FAST)
def _pair_block(x0, x1, ref, has_ref, t0, t1, lo, hi, acc):
    """Two models, elements lo:hi: the same sums as _geometry_pass, written out without per-model loops.

    acc (16,) float64: weight gram 00 01 11, task gram 00 01 11, ref_sq, mass 0 1, then counts:
    contested, conflicts, trimmed contested, trimmed conflicts (with N = 2 every contested
    coordinate has m = 2, so the chance count is contested / 2).
    """
    g00 = g01 = g11 = t00 = t01 = t11 = rs = m0 = m1 = 0.0
    both = conf = tboth = tconf = 0
    for j in range(lo, hi):
        a = load(x0, j)
        b = load(x1, j)
        r = load(ref, j) if has_ref else (a + b) / np.float32(2)
        da = a - r
        db = b - r
        a64, b64, da64, db64, r64 = np.float64(a), np.float64(b), np.float64(da), np.float64(db), np.float64(r)
        g00 += a64 * a64
        g01 += a64 * b64
        g11 += b64 * b64
        t00 += da64 * da64
        t01 += da64 * db64
        t11 += db64 * db64
        rs += r64 * r64
        m0 += abs(da64)
        m1 += abs(db64)
        opposite = ((da > 0) & (db < 0)) | ((da < 0) & (db > 0))
        contested = (da != 0) & (db != 0)
        kept = contested & (abs(da) >= t0) & (abs(db) >= t1)
        both += contested
        conf += opposite
        tboth += kept
        tconf += kept & opposite
    acc[0] += g00
    acc[1] += g01
    acc[2] += g11
    acc[3] += t00
    acc[4] += t01
    acc[5] += t11
    acc[6] += rs
    acc[7] += m0
    acc[8] += m1
    acc[9] += both
    acc[10] += conf
    acc[11] += tboth
    acc[12] += tconf


def _pair_pass(x0: np.ndarray, x1: np.ndarray, ref: np.ndarray, has_ref: bool, threshold: np.ndarray) -> dict:
    t0, t1 = np.float32(threshold[0]), np.float32(threshold[1])
    starts = range(0, x0.shape[0], _PAIR_BLOCK)
    parts = np.zeros((len(starts), 16))  # float64 partial sums per block, added up in block order

    def block(k: int) -> None:
        _pair_block(x0, x1, ref, has_ref, t0, t1, starts[k], min(starts[k] + _PAIR_BLOCK, x0.shape[0]), parts[k])

    threads = min(len(starts), torch.get_num_threads())
    if threads > 1:  # the kernel releases the GIL: blocks run on torch's number of threads
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(block, range(len(starts))))
    else:
        for k in range(len(starts)):
            block(k)
    acc = parts.sum(axis=0)
    gram_w = np.array([[acc[0], acc[1]], [acc[1], acc[2]]])
    gram_t = np.array([[acc[3], acc[4]], [acc[4], acc[5]]])
    return {"weight_gram": gram_w, "task_gram": gram_t, "ref_sq": float(acc[6]), "mass_total": acc[7:9].copy(),
            "conflicts": [int(acc[10]), int(acc[9]), acc[9] / 2], "trimmed": [int(acc[12]), int(acc[11]), acc[11] / 2]}


_PAIR_BLOCK = 1 << 21


def _flat(t: Tensor, dtype: torch.dtype) -> np.ndarray:
    t = t.reshape(-1)
    if t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous():
        t = t.to(device="cpu", dtype=dtype).contiguous()
    return as_array(t)


def geometry_pass(weights: Sequence[Tensor], reference: Tensor | None, threshold: Tensor) -> dict[str, np.ndarray]:
    """The sums of one tensor name, read in place from the stored tensors.

    Args:
        weights: N tensors of one shape; bfloat16 or float32 are read as stored (other
            dtypes, or a mix, are converted to float32 first).
        reference: the base tensor, or None for the models' mean.
        threshold: (N,) trim thresholds (geometry.magnitude_profile).

    Returns:
        weight_gram, task_gram (N, N) float64 symmetric; ref_sq float; mass_total (N,);
        conflicts, trimmed: [conflicts, contested, chance] before and after the trim.
    """
    n = len(weights)
    dtypes = {t.dtype for t in weights}
    dtype = dtypes.pop() if len(dtypes) == 1 and weights[0].dtype in KERNEL_DTYPES else torch.float32
    xs = tuple(_flat(t, dtype) for t in weights)
    if reference is None:
        ref, has_ref = xs[0], False
    else:
        ref, has_ref = _flat(reference, reference.dtype if reference.dtype in KERNEL_DTYPES else torch.float32), True
    if n == 2:
        return _pair_pass(xs[0], xs[1], ref, has_ref, threshold.numpy())
    blocks = max(1, -(-xs[0].shape[0] // _BLOCK))
    gram_w, gram_t = np.zeros((blocks, n, n)), np.zeros((blocks, n, n))
    ref_sq, mass = np.zeros(blocks), np.zeros((blocks, n))
    hist, conflicts = np.zeros((blocks, 2, n + 1), np.int64), np.zeros((blocks, 2), np.int64)
    if xs[0].shape[0]:
        _geometry_pass(xs, ref, has_ref, threshold.numpy().astype(np.float32), gram_w, gram_t, ref_sq, mass,
                       hist, conflicts)
    chance_of = np.array([0.0, 0.0, *(1 - 2.0 ** (1 - m) for m in range(2, n + 1))])
    hist = hist.sum(axis=0)  # (2, N + 1)

    def symmetric(g: np.ndarray) -> np.ndarray:
        g = g.sum(axis=0)
        return np.tril(g) + np.tril(g, -1).T

    def counts(row: int) -> list[float]:
        return [int(conflicts[:, row].sum()), int(hist[row, 2:].sum()), float(hist[row] @ chance_of)]

    return {"weight_gram": symmetric(gram_w), "task_gram": symmetric(gram_t), "ref_sq": float(ref_sq.sum()),
            "mass_total": mass.sum(axis=0), "conflicts": counts(0), "trimmed": counts(1)}
