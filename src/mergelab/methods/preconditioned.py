"""Merges that respect the geometry each model was trained in: a weighted mean under a metric.

    theta = (sum_i l_i G_i)^-1 sum_i l_i G_i theta_i

G_i = I is plain averaging. A diagonal G_i (one number per weight) gives
`preconditioned`, and with G_i the diagonal Fisher `fisher`, with G_i the
optimizer's preconditioner `optimizer_aware`. A full (in, in) Gram matrix of a
linear layer's inputs gives `regmean`. `gradient_matching` adds a prior H_0 at
the base model and merges task vectors. The statistics come from
mergelab.stats (diagonal_fisher, gram_matrices, extract_optimizer_metrics).

Every method here takes ``stats`` as a keyword: (N, *shape) metric tensors, one
row per row of x, or for regmean (N, in, in) Gram matrices. Metrics are checked
before use: a non-finite or negative entry raises StatsError naming the model
row; entries below the floor are raised to it with a MetricFloorWarning (a
zero Fisher is common, for weights the data never touched).
"""

from __future__ import annotations

import warnings

import torch
from pydantic import Field
from torch import Tensor

from mergelab.errors import MergeError, StatsError
from mergelab.methods.registry import MethodParams, PerModel, merge_method


class MetricFloorWarning(UserWarning):
    """Some metric entries were below the floor and were raised to it."""


class MetricWeight(MethodParams):
    """Per-model parameter of every metric-weighted mean."""

    weight: float = Field(1.0, ge=0, description="lambda_i, this model's weight in the metric-weighted mean")


class PreconditionedShared(MethodParams):
    """Shared parameters of `preconditioned` and `optimizer_aware`."""

    epsilon: float = Field(1e-12, gt=0, description="floor on every metric entry (zeros become epsilon)")


class FisherShared(MethodParams):
    """Shared parameters of `fisher`."""

    fisher_floor: float = Field(1e-6, gt=0, description="floor on every Fisher entry, after normalisation")
    normalize_fisher: bool = Field(
        False, description="divide each model's Fisher of this tensor by its L2 norm before merging")


def _view(v: Tensor, like: Tensor) -> Tensor:
    """(N,) -> (N, 1, ..., 1) broadcasting against ``like`` (N, *shape)."""
    return v.view(-1, *[1] * (like.dim() - 1))


def _weights(method: str, x: Tensor, p: PerModel) -> Tensor:
    if len(p) != x.shape[0]:
        raise MergeError(f"{method} got {x.shape[0]} models but {len(p)} parameter sets; pass one per model")
    w = p.tensor("weight", like=x)  # (N,)
    if not bool((w > 0).any()):
        raise MergeError(f"{method}: every model has weight 0, so there is nothing to average; "
                         "give at least one model a positive weight")
    return w


def check_metrics(method: str, x: Tensor, stats: Tensor | None, *, what: str = "metric") -> Tensor:
    """Return ``stats`` in x's dtype after checking it: shape of x, finite, non-negative.

    Raises:
        StatsError: no statistics, another shape, or bad entries; names the model row at fault.
    """
    if stats is None:
        raise StatsError(f"{method} needs one {what} tensor per model (stats=...); compute them with "
                         "`mergelab stats` or mergelab.stats and list them under each model's `stats:`")
    if tuple(stats.shape) != tuple(x.shape):
        raise StatsError(f"{method}: {what} tensors have shape {tuple(stats.shape)}, the models' tensors "
                         f"{tuple(x.shape)}; the statistics were computed for another model")
    stats = stats.to(x.dtype)
    for i, row in enumerate(stats):
        bad = int((~torch.isfinite(row)).sum())
        if bad:
            raise StatsError(f"{method}: the {what} of model {i} has {bad} non-finite entries (NaN or inf); "
                             "recompute that model's statistics")
        neg = int((row < 0).sum())
        if neg:
            raise StatsError(f"{method}: the {what} of model {i} has {neg} negative entries; a diagonal "
                             "metric is a variance or curvature and cannot be negative, recompute it")
    return stats


def floor_metrics(method: str, g: Tensor, floor: float, *, what: str = "metric") -> Tensor:
    """max(g, floor), warning with the number of entries raised per model."""
    low = (g < floor).flatten(1).sum(1)  # (N,)
    if bool(low.any()):
        counts = ", ".join(f"model {i}: {int(c)}" for i, c in enumerate(low) if c)
        warnings.warn(f"{method}: {what} entries below the floor {floor:g} were raised to it ({counts} of "
                      f"{g[0].numel()} per model)", MetricFloorWarning, stacklevel=3)
    return g.clamp_min(floor)


def metric_mean(x: Tensor, g: Tensor, w: Tensor) -> Tensor:
    """sum_i w_i g_i x_i / sum_i w_i g_i elementwise. x, g: (N, *shape), w: (N,), g > 0."""
    wg = g * _view(w, g)  # (N, *shape)
    return (wg * x).sum(0) / wg.sum(0)


def weighted_objective(theta: Tensor, x: Tensor, stats: Tensor, weights: Tensor | None = None) -> Tensor:
    """J(theta) = sum_i l_i (theta - theta_i)^T G_i (theta - theta_i) for diagonal metrics G_i.

    The metric-weighted mean minimises J; comparing J of two merges says which one
    stays closer to every model in that model's own geometry.

    Args:
        theta: (*shape) a merged tensor.
        x: (N, *shape) the models' tensors.
        stats: (N, *shape) their diagonal metrics.
        weights: (N,) the l_i, 1 by default.

    Returns:
        A scalar tensor.
    """
    w = torch.ones(x.shape[0], dtype=x.dtype, device=x.device) if weights is None else weights.to(x.dtype)
    d = theta.unsqueeze(0) - x  # (N, *shape)
    return (_view(w, x) * stats.to(x.dtype) * d * d).sum()


@merge_method("preconditioned", model_params=MetricWeight, shared_params=PreconditionedShared,
              elementwise=True, needs_stats=True)
def preconditioned(x: Tensor, base: None, p: PerModel[MetricWeight], s: PreconditionedShared,
                   gen=None, *, stats: Tensor | None = None) -> Tensor:
    """Weighted mean under diagonal metrics: each weight pulled towards the models sure of it.

    theta = sum_i l_i G_i theta_i / sum_i l_i G_i   (elementwise, G_i diagonal)

    with G_i floored at epsilon. It minimises J(theta) = sum_i l_i (theta -
    theta_i)^T G_i (theta - theta_i); G_i = I gives the weighted average. The
    general form behind Fisher merging (Matena & Raffel, 2022, arXiv:2111.09832)
    and RegMean (Jin et al., 2023, arXiv:2212.09849), for any diagonal metric.

    Per-model parameters: weight (1.0) l_i >= 0. Shared: epsilon (1e-12), the
    floor that turns zero metric entries into a tiny positive weight (where every
    model's metric is zero the result is the weighted average).

    Args:
        x: (N, *shape) the models' tensors.
        base: unused (None).
        p: per-model parameters, one per row of x.
        s: shared parameters.
        gen: unused.
        stats: (N, *shape) the models' diagonal metrics, non-negative and finite.

    Returns:
        (*shape) the merged tensor.

    Raises:
        StatsError: missing, misshapen, non-finite or negative metrics.
    """
    w = _weights("preconditioned", x, p)
    g = floor_metrics("preconditioned", check_metrics("preconditioned", x, stats), s.epsilon)
    return metric_mean(x, g, w)


@merge_method("optimizer_aware", model_params=MetricWeight, shared_params=PreconditionedShared,
              elementwise=True, needs_stats=True)
def optimizer_aware(x: Tensor, base: None, p: PerModel[MetricWeight], s: PreconditionedShared,
                    gen=None, *, stats: Tensor | None = None) -> Tensor:
    """Merge each model in the geometry of its own optimizer: `preconditioned` on optimizer metrics.

    theta = sum_i l_i G_i theta_i / sum_i l_i G_i, where G_i is read from model i's
    saved optimizer state by mergelab.stats.extract_optimizer_metrics:
    Adam/AdamW G = sqrt(v_hat) + eps with v_hat = exp_avg_sq / (1 - beta2^step);
    SGD (with or without momentum) G = 1; Adagrad G = sqrt(sum) + eps; RMSprop
    G = sqrt(square_avg) + eps. Models trained with different optimizers merge
    each in its own geometry; extract with ``divide_by_lr=True`` to put the
    metrics in one unit (inverse step size) when their learning rates differ.
    Data-free. No paper of its own: the metric view of Adam as a diagonal
    preconditioner (Kingma & Ba, 2015, arXiv:1412.6980) applied to merging.

    Per-model parameters: weight (1.0) l_i >= 0. Shared: epsilon (1e-12) floor.

    Args:
        x: (N, *shape) the models' tensors.
        base: unused (None).
        p: per-model parameters, one per row of x.
        s: shared parameters.
        gen: unused.
        stats: (N, *shape) the optimizer metrics G_i.

    Returns:
        (*shape) the merged tensor.
    """
    w = _weights("optimizer_aware", x, p)
    g = floor_metrics("optimizer_aware", check_metrics("optimizer_aware", x, stats), s.epsilon)
    return metric_mean(x, g, w)


@merge_method("fisher", model_params=MetricWeight, shared_params=FisherShared, needs_stats=True)
def fisher(x: Tensor, base: None, p: PerModel[MetricWeight], s: FisherShared,
           gen=None, *, stats: Tensor | None = None) -> Tensor:
    """Fisher merging: the weighted mean under each model's diagonal Fisher information.

    theta = sum_i l_i F_i theta_i / sum_i l_i F_i,  F_i <- max(F_i / c_i, fisher_floor),
    c_i = ||F_i||_2 over this tensor if normalize_fisher else 1.
    Matena & Raffel, 2022, "Merging Models with Fisher-Weighted Averaging",
    arXiv:2111.09832.

    Per-model parameters: weight (1.0) l_i >= 0. Shared: fisher_floor (1e-6, the
    constant of MergeLM and FusionBench, which add it where we take a maximum so
    that a clearly nonzero Fisher is used as is), normalize_fisher (False).
    Normalising is per tensor (the
    engine merges one tensor at a time), as the "param" option of the RegMean
    authors' code; it stops a model whose Fisher is larger overall from
    dominating. It makes the method depend on the whole tensor, so the engine
    does not merge fisher in row chunks.

    FusionBench's fisher merging adds its minimal_fisher_weight m to every entry and,
    with normalize_fisher_weight, weights model i by 1 / (||F_i|| + m) with the norm over
    the whole model: it equals this method with stats F_i + m and those weights. Its
    Fisher estimate (after MergeLM) squares the batch gradient of sum_c sqrt(p_c) log p_c,
    keeping cross terms between classes and examples; diagonal_fisher(kind="exact") is
    the diagonal sum_c p_c (d log p_c)^2 of each example.

    Args:
        x: (N, *shape) the models' tensors.
        base: unused (None).
        p: per-model parameters, one per row of x.
        s: shared parameters.
        gen: unused.
        stats: (N, *shape) diagonal Fisher of each model (mergelab.stats.diagonal_fisher).

    Returns:
        (*shape) the merged tensor.
    """
    w = _weights("fisher", x, p)
    f = check_metrics("fisher", x, stats, what="Fisher")
    if s.normalize_fisher:
        norms = f.flatten(1).norm(dim=1)  # (N,)
        # A model whose Fisher is zero on this tensor stays zero (then floored) rather than dividing by 0.
        f = f / _view(torch.where(norms > 0, norms, torch.ones_like(norms)), f)
    f = floor_metrics("fisher", f, s.fisher_floor, what="Fisher")
    return metric_mean(x, f, w)



class RegMeanShared(MethodParams):
    """Shared parameters of `regmean`."""

    alpha: float = Field(0.1, ge=0, le=1, description=(
        "scale of the Gram matrices' off-diagonal entries: G~ = alpha G + (1 - alpha) diag(G)"))
    transposed: bool = Field(False, description=(
        "the weight is stored (in, out), as transformers' Conv1D does, instead of nn.Linear's (out, in)"))
    ridge: float = Field(1e-6, gt=0, description=(
        "relative ridge added only when the summed Gram is singular, pulling towards the weighted average"))


def _check_grams(x: Tensor, grams: Tensor, transposed: bool) -> None:
    n_in = x.shape[1] if transposed else x.shape[2]
    want = (x.shape[0], n_in, n_in)
    if tuple(grams.shape) != want:
        hint = ""
        if not transposed and grams.shape[-1] == x.shape[1] != x.shape[2]:
            hint = " (it fits a weight stored (in, out) like transformers' Conv1D: set `transposed: true`)"
        raise StatsError(f"regmean: Gram matrices have shape {tuple(grams.shape)}, a weight of shape "
                         f"{tuple(x.shape[1:])} needs {want}{hint}")
    for i, g in enumerate(grams):
        bad = int((~torch.isfinite(g)).sum())
        if bad:
            raise StatsError(f"regmean: the Gram matrix of model {i} has {bad} non-finite entries; "
                             "recompute that model's statistics")


def _solve_towards(a: Tensor, b: Tensor, fallback: Tensor, ridge: float) -> Tensor:
    """Solve a m = b by Cholesky; if a is singular, solve (a + r I) m = b + r fallback instead.

    The ridge pulls the directions no input ever spanned towards ``fallback``
    (the weighted average) rather than towards zero, and leaves the others
    nearly unchanged. r starts at ``ridge`` times the mean diagonal of a and
    grows tenfold until a is positive definite.
    """
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(b, chol)
    scale = float(a.diagonal().mean())
    r = ridge * (scale if scale > 0 else 1.0)
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    for _ in range(12):
        chol, info = torch.linalg.cholesky_ex(a + r * eye)
        if int(info) == 0:
            warnings.warn(f"regmean: the summed Gram matrix is singular; added a ridge {r:.3g} towards the "
                          "weighted average", MetricFloorWarning, stacklevel=4)
            return torch.cholesky_solve(b + r * fallback, chol)
        r *= 10
    raise StatsError("regmean: the summed Gram matrix stays indefinite even with a large ridge; "
                     "its statistics are not Gram matrices (X^T X), recompute them")


def _regmean_solve(x: Tensor, stats: Tensor, w: Tensor, average: Tensor, s: RegMeanShared) -> Tensor:
    """W^T = (sum_i l_i G~_i)^-1 sum_i l_i G~_i W_i^T in float64 (regmean's formula), towards `average`."""
    _check_grams(x, stats, s.transposed)
    g = stats.to(torch.float64)
    g = 0.5 * (g + g.transpose(1, 2))  # accumulated X^T X can be asymmetric by rounding
    if s.alpha != 1:
        diag = torch.diag_embed(g.diagonal(dim1=1, dim2=2))
        g = s.alpha * g + (1 - s.alpha) * diag  # (N, in, in)
    m = x.to(torch.float64) if s.transposed else x.to(torch.float64).transpose(1, 2)  # (N, in, out)
    wg = g * _view(w.to(torch.float64), g)  # (N, in, in)
    a = wg.sum(0)  # (in, in)
    b = torch.bmm(wg, m).sum(0)  # (in, out)
    fallback = average.to(torch.float64) if s.transposed else average.to(torch.float64).T
    merged = _solve_towards(a, b, fallback, s.ridge)  # (in, out)
    return (merged if s.transposed else merged.T).to(x.dtype).contiguous()


@merge_method("regmean", model_params=MetricWeight, shared_params=RegMeanShared, needs_stats=True)
def regmean(x: Tensor, base: None, p: PerModel[MetricWeight], s: RegMeanShared,
            gen=None, *, stats: Tensor | None = None) -> Tensor:
    """RegMean: the linear layer whose outputs best match every model's on that model's inputs.

    For a linear weight W_i (out, in) with Gram matrix G_i = X_i^T X_i of the
    layer's inputs (in, in):

        W^T = (sum_i l_i G~_i)^-1 sum_i l_i G~_i W_i^T,  G~_i = alpha G_i + (1 - alpha) diag(G_i)

    the minimiser of sum_i l_i ||X_i W^T - X_i W_i^T||^2 (alpha = 1). Tensors
    without a Gram matrix (biases, norms, embeddings: ``stats`` None) get the
    weighted average sum_i l_i theta_i / sum_i l_i.
    Jin, Ren, Preotiuc-Pietro, Cheng, 2023, "Dataless Knowledge Fusion by
    Merging Weights of Language Models", arXiv:2212.09849.

    Statistics: Gram matrices are keyed by the linear layer's *weight* name
    (``...q_proj.weight``) in the stats checkpoint; the engine passes them as
    ``stats`` for that weight and None for every other tensor.
    mergelab.stats.gram_matrices stores means X^T X / rows; pass each model's
    row count as its weight to weight models by their data instead.

    Per-model parameters: weight (1.0) l_i >= 0. Shared: alpha (0.1: the value
    in the authors' released configurations for their emotion and NER
    experiments, and FusionBench's default; 1.0 is exact RegMean), transposed
    (False; True for weights stored (in, out) like transformers' Conv1D), ridge
    (1e-6). The solve is a Cholesky factorisation in float64, never an explicit
    inverse. A singular sum (an input feature that is always zero, alpha = 1
    with fewer rows than features) gets a ridge r I on the left and r W_avg^T on
    the right, r growing from ridge x mean diagonal until the factorisation
    succeeds, with a warning: directions no input spans take the weighted
    average instead of zero. FusionBench's RegMean (reduce_non_diagonal_ratio is
    alpha, the same mean Gram matrices) inverts the float32 sum with torch.inverse:
    the same tensors to its float32 inversion error, and an error on a singular sum.

    Args:
        x: (N, out, in) the models' weights ((N, in, out) if transposed), or any
            shape when stats is None.
        base: unused (None).
        p: per-model parameters, one per row of x.
        s: shared parameters.
        gen: unused.
        stats: (N, in, in) Gram matrices, or None.

    Returns:
        The merged tensor, x's shape without the first dimension.
    """
    w = _weights("regmean", x, p)
    average = (_view(w, x) * x).sum(0) / w.sum()
    if stats is None:
        return average
    if x.dim() != 3:
        raise StatsError(f"regmean: Gram matrices were given for a tensor of shape {tuple(x.shape[1:])}; "
                         "only 2-D linear weights have them, remove these statistics")
    return _regmean_solve(x, stats, w, average, s)
