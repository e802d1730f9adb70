"""Sparsified task-vector merges: TIES, DARE, breadcrumbs, DELLA and SCE.

Each method is a short composition of the primitives at the top of this file:

    keep_top_magnitude       exactly k entries of largest |x|          (TIES trim)
    drop_random              Bernoulli(density) keep mask               (DARE)
    keep_magnitude_band      drop the largest gamma share and the
                             smallest, keep a density share             (breadcrumbs)
    della_keep_probabilities rank-based keep probabilities per row      (DELLA)
    rescale_to_norm          restore a task vector's former L1 norm     (MergeKit's rescale)
    elect_sign               sign of the summed task vectors            (TIES elect)
    disjoint_mean            mean of the entries that agree with it     (TIES merge)

Masks are returned, not applied, so primitives stay pure; a method applies them in
place to task vectors it computed itself (never to its inputs). Names, parameters
and defaults follow MergeKit 0.1.5; docs/methods.md lists where we differ and why.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from fractions import Fraction

import torch
from pydantic import Field, model_validator
from torch import Generator, Tensor

from mergelab.errors import MergeError
from mergelab.methods import MethodParams, PerModel, merge_method
from mergelab.methods.kernels import lazy_kernel
from mergelab.methods.task_arithmetic import (
    DareShared,
    DellaShared,
    TaskArithmeticShared,
    TaskVectorParams,
    TiesShared,
    add_to_base,
    check_inputs,
    weighted_sum,
)

# ----------------------------------------------------------------------------- primitives


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


def drop_random(like: Tensor, density: float, gen: Generator) -> Tensor:
    """Keep mask (0./1. in like's dtype) with each entry kept with probability ``density``.

    Draws with torch.bernoulli on a tensor of probabilities, which consumes the
    generator exactly as MergeKit's draw from the global generator does, so
    the same seed gives the same mask.
    """
    return torch.bernoulli(torch.full_like(like, density), generator=gen)


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


def rescale_to_norm(kept: Tensor, target: float | Tensor, *, eps: float = 1e-7,
                    out: Tensor | None = None) -> Tensor:
    """kept * target / ||kept||_1: give a thinned task vector back its former L1 norm.

    Left unscaled when either norm is below ``eps``, as in MergeKit. Writes into
    ``out`` when given (it may be ``kept`` itself).
    """
    after = torch.linalg.vector_norm(kept, ord=1)
    if float(target) < eps or float(after) < eps:
        return kept if out is None else out.copy_(kept)
    return torch.mul(kept, target / after, out=out) if out is not None else kept * (target / after)


def elect_sign(deltas: Tensor) -> Tensor:
    """(*shape) +1/-1: sign of sum_i deltas_i, with +1 where the sum is zero (TIES, MergeKit 'sum')."""
    total = deltas.sum(dim=0)  # (*shape)
    return total.ge_(0).mul_(2).sub_(1)  # ge_ on a float tensor writes 1.0 / 0.0


def disjoint_mean(weighted: Tensor, sign: Tensor, weights: Tensor, *, normalize: bool = True) -> Tensor:
    """Sum of the entries whose sign agrees with ``sign``, over the weights of those entries.

    out = sum_i d_i [sign(d_i) = s] / sum_i w_i [sign(d_i) = s]; zero entries never agree.
    Where nothing agrees the sum is left undivided (it is 0 unless weights are negative).

    Args:
        weighted: (N, *shape) task vectors already multiplied by their weights.
        sign: (*shape) the elected sign, +1 or -1.
        weights: (N,) the weights (the divisor's terms).
        normalize: divide by the agreeing weights; otherwise return the plain sum.
    """
    total = torch.zeros_like(sign)
    divisor = torch.zeros_like(sign) if normalize else None
    for w, row in zip(weights.tolist(), weighted):
        agree = row * sign > 0  # (*shape) bool, one row at a time to bound memory
        total.add_(torch.where(agree, row, 0.0))
        if normalize:
            divisor.add_(agree, alpha=w)
    if normalize:
        total.div_(divisor.masked_fill_(divisor == 0, 1))
    return total


_CHUNK = 1 << 18  # elements per block: the N rows of a block stay in cache through every step


def elect_and_combine(weighted: Tensor, weights: Tensor, *, normalize: bool = True) -> Tensor:
    """disjoint_mean(weighted, elect_sign(weighted), weights) computed block by block.

    Every step after trimming is elementwise, so working on cache-sized blocks
    of the flattened tensor gives the same numbers with a fraction of the
    memory traffic and of the scratch memory of whole-tensor passes.
    """
    n = weighted.shape[0]
    flat = weighted.reshape(n, -1)
    out = torch.empty(flat.shape[1], dtype=weighted.dtype, device=weighted.device)
    for start in range(0, flat.shape[1], _CHUNK):
        block = flat[:, start:start + _CHUNK]
        out[start:start + _CHUNK] = disjoint_mean(block, elect_sign(block), weights, normalize=normalize)
    return out.reshape(weighted.shape[1:])


# ----------------------------------------------------------------------------- parameters


class BreadcrumbsParams(TaskVectorParams):
    """Per-model parameters of breadcrumbs and breadcrumbs_ties."""

    gamma: float = Field(0.01, ge=0, le=1, description="share of largest-magnitude entries removed as outliers")


class DellaParams(TaskVectorParams):
    """Per-model parameters of della and della_linear."""

    epsilon: float = Field(0.15, ge=0, description="half-width of the keep probabilities around density")

    @model_validator(mode="after")
    def _probabilities_in_range(self) -> DellaParams:
        if self.density < 1 and not (self.density - self.epsilon > 0 and self.density + self.epsilon < 1):
            raise ValueError(
                f"epsilon {self.epsilon} with density {self.density} gives keep probabilities outside (0, 1); "
                f"choose epsilon below {min(self.density, 1 - self.density):g}"
            )
        return self


class SceShared(MethodParams):
    """Shared parameters of sce."""

    select_topk: float = Field(1.0, ge=0, le=1, description="share of entries kept, by variance across models")
    int8_mask: bool = Field(False, description="MergeKit's memory option for its masks; no numerical effect")


# ----------------------------------------------------------------------------- compositions

# keep(task_vector, params, gen) -> mask to multiply by, or None when nothing is dropped.
KeepFn = Callable[[Tensor, MethodParams, "Generator | None"], "Tensor | None"]


def _magnitude(t: Tensor, q: TaskVectorParams, gen) -> Tensor | None:
    return None if q.density >= 1 else keep_top_magnitude(t, q.density)


def _random(t: Tensor, q: TaskVectorParams, gen) -> Tensor | None:
    return None if q.density >= 1 else drop_random(t, q.density, gen)


def _band(t: Tensor, q: BreadcrumbsParams, gen) -> Tensor | None:
    return None if q.density >= 1 else keep_magnitude_band(t, q.density, q.gamma)


def _della(t: Tensor, q: DellaParams, gen) -> Tensor | None:
    if q.density >= 1:
        return None
    return torch.bernoulli(della_keep_probabilities(t, q.density, q.epsilon), generator=gen)


def _thinned(x: Tensor, base: Tensor, p: PerModel, s: TaskArithmeticShared, keep: KeepFn, gen,
             out: Tensor | None = None) -> Iterator[Tensor]:
    """Yield each model's task vector (*shape) after its keep mask and optional L1 rescale.

    Rows are written into ``out`` (N, *shape) when given, else into fresh tensors.
    """
    for i, row in enumerate(x):
        delta = torch.sub(row, base, out=out[i]) if out is not None else row - base
        mask = keep(delta, p[i], gen)
        if mask is not None:
            before = torch.linalg.vector_norm(delta, ord=1) if s.rescale else None
            delta.mul_(mask)
            del mask
            if s.rescale:
                rescale_to_norm(delta, before, out=delta)
        yield delta


def _merge(name: str, x: Tensor, base: Tensor, p: PerModel, s: TaskArithmeticShared, gen,
           keep: KeepFn, *, ties: bool, randomized: bool = False) -> Tensor:
    """The generalised task-arithmetic pipeline on float32: thin, weight, (elect and) combine, add to base."""
    check_inputs(name, x, base, p)
    if randomized and gen is None:
        raise MergeError(f"{name} is randomised and needs a torch.Generator; the engine seeds one per tensor")
    weights = p.tensor("weight", like=x)  # (N,)
    if not ties:
        merged = weighted_sum(_thinned(x, base, p, s, keep, gen), weights, normalize=s.normalize)
        return add_to_base(base, merged, s.lambda_)
    deltas = torch.empty_like(x)  # (N, *shape): the sign election needs every task vector at once
    for w, delta in zip(weights.tolist(), _thinned(x, base, p, s, keep, gen, out=deltas)):
        delta.mul_(w)
    merged = elect_and_combine(deltas, weights, normalize=s.normalize)
    del deltas
    return add_to_base(base, merged, s.lambda_)


_COMMON = """
    Per-model parameters: weight (required); density (1.0, in (0, 1]){extra}.
    Shared: normalize ({normalize}), rescale ({rescale}; L1 rescale of each thinned
    task vector to its former norm), lambda (1.0; scales the merged task vector),
    int8_mask (False; no numerical effect).

    Args:
        x: (N, *shape) the fine-tuned models' tensors.
        base: (*shape) the base model's tensor.
        p: per-model parameters, one per row of x.
        s: shared parameters.
        gen: {gen}

    Returns:
        (*shape) the merged weights, base + merged task vector.
"""


def _documented(*, normalize: bool, rescale: bool, extra: str = "", randomized: bool = False):
    """Append the parameter and Args sections every task-vector method shares to its docstring."""
    gen = ("the generator every random draw comes from; the same seed gives the same bits."
           if randomized else "unused (the method is deterministic).")

    def attach(fn):
        common = _COMMON.format(normalize=normalize, rescale=rescale, extra=extra, gen=gen)
        fn.__doc__ = fn.__doc__.rstrip() + "\n" + common
        return fn

    return attach


_BREADCRUMBS = "; gamma (0.01, in [0, 1]) share of largest entries removed"
_DELLA = "; epsilon (0.15) with 0 < density - epsilon and density + epsilon < 1"


@merge_method("ties", model_params=TaskVectorParams, shared_params=TiesShared, base="required",
              kernel=lazy_kernel("ties"))
@_documented(normalize=True, rescale=False)
def ties(x: Tensor, base: Tensor, p: PerModel[TaskVectorParams], s: TiesShared, gen=None) -> Tensor:
    """TIES-Merging: trim, elect sign, disjoint mean.

    tau_i = keep_top_magnitude(theta_i - theta_base, density_i), d_i = w_i tau_i,
    s = sign(sum_i d_i), theta = theta_base + lambda * sum_i d_i [sign d_i = s] / Z,
    Z = sum_i w_i [sign d_i = s] if normalize else 1.
    Yadav, Tam, Choshen, Raffel, Bansal, 2023, "TIES-Merging: Resolving Interference
    When Merging Models", arXiv:2306.01708.

    Ties at a model's magnitude threshold are kept lowest flat index first, so
    that exactly round(density * numel) entries survive. On the CPU a compiled
    kernel (methods/kernels/ties.py) gives the same numbers from bfloat16 or
    float32 inputs as stored, in two streaming passes.
    """
    return _merge("ties", x, base, p, s, gen, _magnitude, ties=True)


@merge_method("dare_ties", model_params=TaskVectorParams, shared_params=DareShared, base="required",
              randomized=True)
@_documented(normalize=False, rescale=True, randomized=True)
def dare_ties(x: Tensor, base: Tensor, p: PerModel[TaskVectorParams], s: DareShared, gen=None) -> Tensor:
    """DARE with TIES sign election: random drop, rescale, elect sign, disjoint sum.

    tau_i = m_i * (theta_i - theta_base), m_i ~ Bernoulli(density_i) entrywise, then
    rescaled to its former L1 norm; then as ties. (The paper rescales by 1/density;
    MergeKit, and so mergelab, restores the L1 norm instead.)
    Yu, Yu, Yu, Huang, Li, 2023, "Language Models are Super Mario: Absorbing Abilities
    from Homologous Models as a Free Lunch", arXiv:2311.03099.
    """
    return _merge("dare_ties", x, base, p, s, gen, _random, ties=True, randomized=True)


@merge_method("dare_linear", model_params=TaskVectorParams, shared_params=DareShared, base="required",
              randomized=True, divides_by_weight_sum=True)
@_documented(normalize=False, rescale=True, randomized=True)
def dare_linear(x: Tensor, base: Tensor, p: PerModel[TaskVectorParams], s: DareShared, gen=None) -> Tensor:
    """DARE: random drop and rescale of each task vector, then task arithmetic.

    tau_i = m_i * (theta_i - theta_base), m_i ~ Bernoulli(density_i), rescaled to its
    former L1 norm; theta = theta_base + lambda * sum_i w_i tau_i / Z,
    Z = sum_i w_i if normalize else 1.
    Yu, Yu, Yu, Huang, Li, 2023, "Language Models are Super Mario: Absorbing Abilities
    from Homologous Models as a Free Lunch", arXiv:2311.03099.
    """
    return _merge("dare_linear", x, base, p, s, gen, _random, ties=False, randomized=True)


@merge_method("breadcrumbs", model_params=BreadcrumbsParams, shared_params=TaskArithmeticShared,
              base="required", divides_by_weight_sum=True)
@_documented(normalize=False, rescale=False, extra=_BREADCRUMBS)
def breadcrumbs(x: Tensor, base: Tensor, p: PerModel[BreadcrumbsParams], s: TaskArithmeticShared,
                gen=None) -> Tensor:
    """Model Breadcrumbs: drop outliers and small entries of each task vector, then task arithmetic.

    tau_i = keep_magnitude_band(theta_i - theta_base, density_i, gamma_i): the
    floor(gamma n) largest |entries| go, then the smallest, leaving floor(density n);
    theta = theta_base + lambda * sum_i w_i tau_i / Z, Z = sum_i w_i if normalize else 1.
    Davari, Belilovsky, 2023, "Model Breadcrumbs: Scaling Multi-Task Model Merging
    with Sparse Masks", arXiv:2312.06795.
    """
    return _merge("breadcrumbs", x, base, p, s, gen, _band, ties=False)


@merge_method("breadcrumbs_ties", model_params=BreadcrumbsParams, shared_params=TaskArithmeticShared,
              base="required")
@_documented(normalize=False, rescale=False, extra=_BREADCRUMBS)
def breadcrumbs_ties(x: Tensor, base: Tensor, p: PerModel[BreadcrumbsParams], s: TaskArithmeticShared,
                     gen=None) -> Tensor:
    """Model Breadcrumbs with TIES sign election: band of magnitudes, elect sign, disjoint sum.

    tau_i = keep_magnitude_band(theta_i - theta_base, density_i, gamma_i); then as ties.
    Davari, Belilovsky, 2023, arXiv:2312.06795; Yadav et al., 2023, arXiv:2306.01708.
    """
    return _merge("breadcrumbs_ties", x, base, p, s, gen, _band, ties=True)


@merge_method("della", model_params=DellaParams, shared_params=DellaShared, base="required",
              randomized=True)
@_documented(normalize=True, rescale=True, extra=_DELLA, randomized=True)
def della(x: Tensor, base: Tensor, p: PerModel[DellaParams], s: DellaShared, gen=None) -> Tensor:
    """DELLA: magnitude-ranked random drop (MAGPRUNE), rescale, elect sign, disjoint mean.

    tau_i = m_i * (theta_i - theta_base), m_i ~ Bernoulli(p_i) with p_i from
    della_keep_probabilities (density - epsilon for the smallest entry of a row,
    density + epsilon for the largest, linear in rank), rescaled to its former L1
    norm (the paper divides by p_i); then as ties.
    Deep, Bhardwaj, Poria, 2024, "DELLA-Merging: Reducing Interference in Model
    Merging through Magnitude-Based Sampling", arXiv:2406.11617.
    """
    return _merge("della", x, base, p, s, gen, _della, ties=True, randomized=True)


@merge_method("della_linear", model_params=DellaParams, shared_params=DareShared, base="required",
              randomized=True, divides_by_weight_sum=True)
@_documented(normalize=False, rescale=True, extra=_DELLA, randomized=True)
def della_linear(x: Tensor, base: Tensor, p: PerModel[DellaParams], s: DareShared, gen=None) -> Tensor:
    """DELLA without sign election: magnitude-ranked random drop and rescale, then task arithmetic.

    tau_i as in della; theta = theta_base + lambda * sum_i w_i tau_i / Z,
    Z = sum_i w_i if normalize else 1.
    Deep, Bhardwaj, Poria, 2024, arXiv:2406.11617.
    """
    return _merge("della_linear", x, base, p, s, gen, _della, ties=False, randomized=True)


# ----------------------------------------------------------------------------- sce


def keep_top_variance(task_vectors: Tensor, share: float) -> Tensor:
    """(*shape) bool mask of the entries whose task vectors vary most across models.

    Keeps keep_count(share, #entries with nonzero variance) entries of largest
    population variance (ties: lower index).
    """
    var = task_vectors.var(dim=0, unbiased=False)  # (*shape)
    return top_k_mask(var, keep_count(share, int(torch.count_nonzero(var))))


def sce_weights(task_vectors: Tensor) -> Tensor:
    """(N,) eta_i = mean(tau_i^2) / sum_j mean(tau_j^2); uniform when every tau_i is zero."""
    n = task_vectors[0].numel()
    # Fused norm accumulated in float32 even for half-precision inputs; no squared temporary.
    ms = torch.stack([torch.linalg.vector_norm(t, dtype=torch.float32).square() / n for t in task_vectors])
    total = ms.sum()
    # Only an exactly zero total is special (then the merge is zero whatever the weights);
    # MergeKit's absolute 1e-6 threshold would switch small real task vectors to uniform weights.
    weights = ms / total if total > 0 else torch.full_like(ms, 1 / len(ms))
    return weights.to(task_vectors.dtype)


@merge_method("sce", shared_params=SceShared, base="required")
def sce(x: Tensor, base: Tensor, p: PerModel, s: SceShared, gen=None) -> Tensor:
    """SCE: select entries by variance, calculate weights, erase sign conflicts.

    tau_i = (theta_i - theta_base) * M, M = top select_topk share of entries by
    Var_i(tau_i); s = sign(sum_i tau_i); eta_i = mean(tau_i^2) / sum_j mean(tau_j^2);
    theta = theta_base + sum_i eta_i tau_i [sign tau_i = s] / sum_i eta_i [sign tau_i = s].
    Wan, Zhong, Yang, Chen, Quan, 2024, "FuseChat: Knowledge Fusion of Chat Models",
    arXiv:2408.07990.

    Shared parameters: select_topk (1.0, in [0, 1]; 1 keeps every entry);
    int8_mask (False; no numerical effect). No per-model parameters.

    Args:
        x: (N, *shape) the fine-tuned models' tensors.
        base: (*shape) the base model's tensor.
        p: per-model parameters (none), one per row of x.
        s: shared parameters.
        gen: unused (the method is deterministic).

    Returns:
        (*shape) the merged weights.
    """
    check_inputs("sce", x, base, p)
    tv = x - base  # (N, *shape), ours to modify
    if s.select_topk < 1:
        tv.mul_(keep_top_variance(tv, s.select_topk))
    sign = elect_sign(tv)  # elected before weighting, as MergeKit does
    weights = sce_weights(tv)
    for w, row in zip(weights.tolist(), tv):
        row.mul_(w)
    return base + disjoint_mean(tv, sign, weights, normalize=True)
