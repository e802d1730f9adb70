"""Sparsified task-vector merges: TIES, DARE, breadcrumbs and DELLA, with their parameters.

Each method is a short composition of the primitives of trim.py (which entries
of a task vector survive) and consensus.py (sign election and disjoint mean):

    tau_i = keep_i(theta_i - theta_base)        trim.py: magnitude, band, random, DELLA
    tau_i *= ||before||_1 / ||tau_i||_1         optional L1 rescale
    merged = sum_i w_i tau_i (/ sum_i w_i)      linear combination, or
    merged = disjoint_mean(w tau, elect_sign)   consensus.py (the *_ties variants)
    theta = theta_base + lambda * merged

Names, parameters and defaults follow MergeKit 0.1.5; docs/methods.md lists where
we differ and why. The random masks (dare_*, della*) come from a counter-based
generator (counter_rng.py), so a compiled kernel (methods/kernels/) draws the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from pydantic import Field, model_validator
from torch import Tensor

from mergelab.methods.registry import MethodParams, PerModel, merge_method
from mergelab.methods.primitives import require_generator  # noqa: F401  (defined beside the kernels' helpers)
from mergelab.methods.consensus import disjoint_mean, elect_and_combine, elect_sign  # noqa: F401
from mergelab.methods.kernels import lazy_kernel
from mergelab.methods.task_arithmetic import (
    TaskArithmeticShared,
    TaskVectorParams,
    add_to_base,
    check_inputs,
    weighted_sum,
)
from mergelab.methods.trim import (  # noqa: F401  (public names, importable from here as before)
    bracket_quantile,
    della_keep_probabilities,
    drop_random,
    keep_count,
    keep_magnitude_band,
    keep_top_magnitude,
    keep_with_probabilities,
    kth_largest,
    kth_largest_and_count,
    l1_norm,
    rescale_to_norm,
    top_k_mask,
)

# ----------------------------------------------------------------------------- parameters

class TiesShared(TaskArithmeticShared):
    """Shared parameters with TIES's defaults."""

    normalize: bool = Field(True, description="divide by the summed weights of the entries that agree in sign")


class DareShared(TaskArithmeticShared):
    """Shared parameters with DARE's (and linear DELLA's) defaults."""

    rescale: bool = Field(
        True, description="after dropping entries, rescale each task vector to its former L1 norm"
    )


class DellaShared(TaskArithmeticShared):
    """Shared parameters with DELLA's defaults."""

    normalize: bool = Field(True, description="divide by the summed weights of the entries that agree in sign")
    rescale: bool = Field(
        True, description="after dropping entries, rescale each task vector to its former L1 norm"
    )


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


# ----------------------------------------------------------------------------- compositions

# keep(task_vector, params, gen, i) -> mask to multiply by, or None when nothing is dropped;
# i is the model's position, which selects its stream of the counter-based generator.
KeepFn = Callable[[Tensor, MethodParams, "Generator | None", int], "Tensor | None"]


def _magnitude(t: Tensor, q: TaskVectorParams, gen, i: int) -> Tensor | None:
    return None if q.density >= 1 else keep_top_magnitude(t, q.density)


def _random(t: Tensor, q: TaskVectorParams, gen, i: int) -> Tensor | None:
    return None if q.density >= 1 else drop_random(t, q.density, gen, stream=i)


def _band(t: Tensor, q: BreadcrumbsParams, gen, i: int) -> Tensor | None:
    return None if q.density >= 1 else keep_magnitude_band(t, q.density, q.gamma)


def _della(t: Tensor, q: DellaParams, gen, i: int) -> Tensor | None:
    if q.density >= 1:
        return None
    return keep_with_probabilities(della_keep_probabilities(t, q.density, q.epsilon), gen, stream=i)


def _thinned(x: Tensor, base: Tensor, p: PerModel, s: TaskArithmeticShared, keep: KeepFn, gen,
             out: Tensor | None = None) -> Iterator[Tensor]:
    """Yield each model's task vector (*shape) after its keep mask and optional L1 rescale.

    Rows are written into ``out`` (N, *shape) when given, else into fresh tensors.
    """
    for i, row in enumerate(x):
        delta = torch.sub(row, base, out=out[i]) if out is not None else row - base
        mask = keep(delta, p[i], gen, i)
        if mask is not None:
            before = l1_norm(delta) if s.rescale else None
            delta.mul_(mask)
            del mask
            if s.rescale:
                rescale_to_norm(delta, before, out=delta)
        yield delta


def _merge(name: str, x: Tensor, base: Tensor, p: PerModel, s: TaskArithmeticShared, gen,
           keep: KeepFn, *, ties: bool, randomized: bool = False) -> Tensor:
    """The generalised task-arithmetic pipeline on float32: thin, weight, (elect and) combine, add to base."""
    check_inputs(name, x, base, p)
    if randomized:
        require_generator(name, gen)
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

    FusionBench's TiesMergingAlgorithm trims each task vector once over the whole
    flattened model (one threshold per model, keeping int(K d) + 1 of its d entries)
    where this, as MergeKit, trims every tensor to its own density; given as densities
    the per-tensor shares FusionBench's threshold keeps, ties gives its tensors
    (merge_func "sum" is normalize false, "mean" normalize true, scaling_factor lambda).
    """
    return _merge("ties", x, base, p, s, gen, _magnitude, ties=True)


@merge_method("dare_ties", model_params=TaskVectorParams, shared_params=DareShared, base="required",
              randomized=True, kernel=lazy_kernel("thinned", mask="random", ties=True))
@_documented(normalize=False, rescale=True, randomized=True)
def dare_ties(x: Tensor, base: Tensor, p: PerModel[TaskVectorParams], s: DareShared, gen=None) -> Tensor:
    """DARE with TIES sign election: random drop, rescale, elect sign, disjoint sum.

    tau_i = m_i * (theta_i - theta_base), m_i ~ Bernoulli(density_i) entrywise, then
    rescaled to its former L1 norm; then as ties. (The paper rescales by 1/density;
    MergeKit, and so mergelab, restores the L1 norm instead.)
    FusionBench's DareTiesMerging rescales by 1/density, draws its masks from torch's
    global generator, and then also applies TIES' magnitude trim (over the whole model);
    at density 1 with that trim keeping everything it gives these tensors exactly.
    Yu, Yu, Yu, Huang, Li, 2023, "Language Models are Super Mario: Absorbing Abilities
    from Homologous Models as a Free Lunch", arXiv:2311.03099.
    """
    return _merge("dare_ties", x, base, p, s, gen, _random, ties=True, randomized=True)


@merge_method("dare_linear", model_params=TaskVectorParams, shared_params=DareShared, base="required",
              randomized=True, divides_by_weight_sum=True, kernel=lazy_kernel("thinned", mask="random", ties=False))
@_documented(normalize=False, rescale=True, randomized=True)
def dare_linear(x: Tensor, base: Tensor, p: PerModel[TaskVectorParams], s: DareShared, gen=None) -> Tensor:
    """DARE: random drop and rescale of each task vector, then task arithmetic.

    tau_i = m_i * (theta_i - theta_base), m_i ~ Bernoulli(density_i), rescaled to its
    former L1 norm; theta = theta_base + lambda * sum_i w_i tau_i / Z,
    Z = sum_i w_i if normalize else 1.
    Yu, Yu, Yu, Huang, Li, 2023, "Language Models are Super Mario: Absorbing Abilities
    from Homologous Models as a Free Lunch", arXiv:2311.03099.
    FusionBench's DareTaskArithmetic (DareSimpleAverage: normalize true) rescales by
    1/density and draws its masks from torch's global generator, so only the statistics
    match (kept share, mean rescale); at density 1 both are task arithmetic, exactly.
    """
    return _merge("dare_linear", x, base, p, s, gen, _random, ties=False, randomized=True)


@merge_method("breadcrumbs", model_params=BreadcrumbsParams, shared_params=TaskArithmeticShared,
              base="required", divides_by_weight_sum=True, kernel=lazy_kernel("thinned", mask="band", ties=False))
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
              base="required", kernel=lazy_kernel("thinned", mask="band", ties=True))
@_documented(normalize=False, rescale=False, extra=_BREADCRUMBS)
def breadcrumbs_ties(x: Tensor, base: Tensor, p: PerModel[BreadcrumbsParams], s: TaskArithmeticShared,
                     gen=None) -> Tensor:
    """Model Breadcrumbs with TIES sign election: band of magnitudes, elect sign, disjoint sum.

    tau_i = keep_magnitude_band(theta_i - theta_base, density_i, gamma_i); then as ties.
    Davari, Belilovsky, 2023, arXiv:2312.06795; Yadav et al., 2023, arXiv:2306.01708.
    """
    return _merge("breadcrumbs_ties", x, base, p, s, gen, _band, ties=True)


@merge_method("della", model_params=DellaParams, shared_params=DellaShared, base="required",
              randomized=True, kernel=lazy_kernel("thinned", mask="della", ties=True))
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
              randomized=True, divides_by_weight_sum=True, kernel=lazy_kernel("thinned", mask="della", ties=False))
@_documented(normalize=False, rescale=True, extra=_DELLA, randomized=True)
def della_linear(x: Tensor, base: Tensor, p: PerModel[DellaParams], s: DareShared, gen=None) -> Tensor:
    """DELLA without sign election: magnitude-ranked random drop and rescale, then task arithmetic.

    tau_i as in della; theta = theta_base + lambda * sum_i w_i tau_i / Z,
    Z = sum_i w_i if normalize else 1.
    Deep, Bhardwaj, Poria, 2024, arXiv:2406.11617.
    """
    return _merge("della_linear", x, base, p, s, gen, _della, ties=False, randomized=True)


