"""Trimming primitives: which entries of a task vector survive.

    keep_top_magnitude       exactly k entries of largest |x|          (TIES trim)
    keep_magnitude_band      drop the largest gamma share and the
                             smallest, keep a density share             (breadcrumbs)
    drop_random              independent keep with probability density (DARE)
    della_keep_probabilities rank-based keep probabilities per row      (DELLA)
    keep_with_probabilities  independent keep with per-entry probability (DELLA)
    rescale_to_norm          restore a task vector's former L1 norm     (MergeKit's rescale)

Masks are returned, not applied, so primitives stay pure. Random masks come from
the counter-based generator of methods/counter_rng.py.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import Generator, Tensor

from mergelab.methods.counter_rng import generator_key, keep_mask

def keep_count(share: float, n: int) -> int:
    """floor(share * n) entries, at least one when share > 0 and n > 0.

    The product is taken on the decimal the user wrote (repr of the float), so
    0.29 of 100 entries is 29, where float arithmetic (MergeKit) gives 28.
    """
    if share <= 0 or n == 0:
        return 0
    return min(n, max(1, math.floor(Fraction(repr(float(share))) * n)))


_SAMPLE = 65536  # sample size that brackets the k-th largest value before the exact selection


def kth_largest(flat: Tensor, k: int) -> Tensor:
    """The exact k-th largest value of a 1-D tensor (same as flat.kthvalue(n - k + 1))."""
    return kth_largest_and_count(flat, k)[0]


def bracket_quantile(sample: Tensor, k: int, n: int) -> tuple[Tensor, Tensor]:
    """(lo, hi) from a sample of n values that holds the k-th largest value with high probability.

    The sample's order statistics around quantile q = 1 - k/n, widened by four
    binomial standard deviations (and two sample steps) on each side.
    """
    m = sample.numel()
    q = 1.0 - k / n  # quantile of the answer
    spread = 4.0 * math.sqrt(max(q * (1 - q), 1.0 / m) / m) + 2.0 / m
    lo = sample.kthvalue(min(m, max(1, int((q - spread) * m)))).values
    hi = sample.kthvalue(min(m, max(1, int(math.ceil((q + spread) * m))))).values
    return lo, hi


def kth_largest_and_count(flat: Tensor, k: int) -> tuple[Tensor, int]:
    """The exact k-th largest value of a 1-D tensor and how many entries are strictly greater.

    A strided sample locates the k-th largest to within a narrow bracket [lo, hi]
    (bracket_quantile); one pass counts the entries above the bracket, one pass
    gathers those inside it, and torch.kthvalue runs on that small band only.
    If the bracket misses (possible with many tied values) the full selection
    runs. Several times faster than a full selection on big tensors.
    """
    n = flat.numel()
    if n > 4 * _SAMPLE:
        lo, hi = bracket_quantile(flat[::n // _SAMPLE], k, n)
        above = int(torch.count_nonzero(flat > hi))
        if above < k:
            band = flat[(flat >= lo).logical_and_(flat <= hi)]  # (inside,)
            if above + band.numel() >= k:
                value = band.kthvalue(band.numel() - (k - above) + 1).values
                return value, above + int(torch.count_nonzero(band > value))
    value = flat.kthvalue(n - k + 1).values
    return value, int(torch.count_nonzero(flat > value))


def top_k_mask(scores: Tensor, k: int) -> Tensor:
    """Bool mask of the k largest scores, exactly k True, without sorting.

    Ties at the threshold go to the lower flat index, so the entries are ranked by
    the total order (score descending, index ascending) and top-k sets are nested.
    """
    n = scores.numel()
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    flat = scores.reshape(-1)
    threshold = kth_largest(flat, k)
    keep = scores >= threshold
    extra = int(keep.sum()) - k
    if extra > 0:
        # Among entries equal to the threshold, drop the ones with the highest indices.
        tied = (flat == threshold).nonzero().squeeze(1)
        keep.view(-1)[tied[tied.numel() - extra:]] = False
    return keep


def keep_top_magnitude(t: Tensor, density: float) -> Tensor:
    """Bool mask keeping the keep_count(density, numel) entries of largest |t| (ties: lower index)."""
    return top_k_mask(t.abs(), keep_count(density, t.numel()))


def keep_magnitude_band(t: Tensor, density: float, gamma: float) -> Tensor:
    """Bool mask of a band of |t|: drop the top gamma share as outliers, then the smallest.

    k = keep_count(density, n) entries are kept; the floor(gamma * n) largest are
    dropped first, fewer if needed so that k entries remain (MergeKit's rule).
    gamma = 0 keeps exactly the top-k magnitudes.
    """
    n = t.numel()
    k = keep_count(density, n)
    n_top = min(math.floor(Fraction(repr(float(gamma))) * n), n - k)
    magnitude = t.abs()
    keep = top_k_mask(magnitude, k + n_top)
    if n_top > 0:
        keep.logical_and_(top_k_mask(magnitude, n_top).logical_not_())
    return keep


def drop_random(like: Tensor, density: float, gen: Generator, stream: int = 0) -> Tensor:
    """Keep mask (0./1. in like's dtype): entry j kept when its counter-based uniform is below ``density``.

    The uniform of entry j comes from a hash of (gen's seed, stream, j)
    (methods/counter_rng.py): each entry is kept independently with probability
    density, and the mask does not depend on processing order or blocking.
    ``stream`` tells the models of one merge apart (their position).
    """
    return keep_mask(like.shape, density, generator_key(gen), stream, like.device).to(like.dtype)


def keep_with_probabilities(probs: Tensor, gen: Generator, stream: int = 0) -> Tensor:
    """Keep mask (0./1. in probs' dtype): entry j kept when its counter-based uniform is below probs[j]."""
    return keep_mask(probs.shape, probs.float(), generator_key(gen), stream, probs.device).to(probs.dtype)


def della_keep_probabilities(t: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA's keep probabilities: linear in the magnitude rank within each row.

    p = density - epsilon + 2 epsilon * r / (m - 1), r = 0..m-1 the rank of |t| along
    dim 1 (the whole tensor if it has fewer than two dims), m its length. Ties rank
    by index. A row of one entry gets p = density, where MergeKit divides by zero.

    Returns:
        float tensor of t's shape and dtype.
    """
    rows = t.reshape(1, -1) if t.dim() < 2 else t
    m = rows.shape[1]
    if m < 2:
        return torch.full_like(t, density)
    order = rows.abs().argsort(dim=1, stable=True)  # one sort of each row, not two
    view = [1] * rows.dim()
    view[1] = m
    ranks = torch.arange(m, dtype=t.dtype, device=t.device).view(view).expand_as(rows)
    ranks = torch.empty_like(rows).scatter_(1, order, ranks)
    del order
    # Same operation order as MergeKit, so the probabilities (and draws) agree bit for bit.
    probs = ranks.div_(m - 1).mul_(2).mul_(epsilon).add_(density - epsilon)
    return probs.reshape(t.shape)


def l1_norm(t: Tensor) -> float:
    """sum |t|, accumulated in float64 (so a compiled kernel's block sums give the same float32 ratio)."""
    return float(torch.linalg.vector_norm(t, ord=1, dtype=torch.float64))


def rescale_to_norm(kept: Tensor, target: float | Tensor, *, eps: float = 1e-7,
                    out: Tensor | None = None) -> Tensor:
    """kept * target / ||kept||_1: give a thinned task vector back its former L1 norm.

    Left unscaled when either norm is below ``eps``, as in MergeKit. The norms
    are summed in float64 and the ratio rounded once to float32 (MergeKit
    divides two float32 sums: the factors agree to float32 rounding). Writes into
    ``out`` when given (it may be ``kept`` itself).
    """
    target, after = float(target), l1_norm(kept)
    if target < eps or after < eps:
        return kept if out is None else out.copy_(kept)
    factor = float(torch.tensor(target / after, dtype=torch.float32))
    return torch.mul(kept, factor, out=out) if out is not None else kept * factor
