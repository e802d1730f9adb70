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
Blocks of the tensor run in parallel; each writes its own row of partial sums,
added up afterwards, so the result does not depend on the thread count.
"""

from __future__ import annotations

from collections.abc import Sequence

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
