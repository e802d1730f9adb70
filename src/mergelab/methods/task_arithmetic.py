"""Task arithmetic, and the parameters and final steps every task-vector method shares.

A task vector is what fine-tuning added to the base model, tau_i = theta_i - theta_base.
Task arithmetic adds a weighted sum of task vectors back onto the base. The sparsified
relatives in sparsify.py (TIES, DARE, breadcrumbs, DELLA) extend the parameter models
and reuse `weighted_sum` / `add_to_base` defined here; they differ only in which entries of
each task vector survive and whether conflicting signs are resolved first.

Names, parameters and defaults follow MergeKit 0.1.5, so a MergeKit recipe gives the
same tensors (within float rounding) except where docs/methods.md lists a difference.
"""

from __future__ import annotations

from pydantic import Field, field_validator
from torch import Tensor

from mergelab.errors import MergeError
from mergelab.methods.registry import MethodParams, PerModel, merge_method
from mergelab.methods.primitives import weight_divisor  # noqa: F401  (defined beside the kernels' helpers)
from mergelab.methods.kernels import lazy_kernel


class TaskVectorParams(MethodParams):
    """Per-model parameters of every task-vector method."""

    weight: float = Field(description="scale of this model's task vector (required, as in MergeKit)")
    density: float = Field(1.0, gt=0, le=1, description="share of this model's task vector that is kept")


class TaskArithmeticParams(TaskVectorParams):
    """Per-model parameters of task_arithmetic: density is accepted for MergeKit recipes, but only 1."""

    @field_validator("density")
    @classmethod
    def _keeps_everything(cls, density: float) -> float:
        # MergeKit accepts and silently ignores density here; we refuse a value that would be ignored.
        if density != 1:
            raise ValueError(
                f"task_arithmetic keeps every entry, so density {density} would have no effect; "
                "use ties, dare_linear or breadcrumbs to sparsify, or remove density"
            )
        return density


class TaskArithmeticShared(MethodParams):
    """Shared parameters of every task-vector method (defaults of task_arithmetic and breadcrumbs)."""

    normalize: bool = Field(False, description="divide the merged task vector by the sum of the weights")
    rescale: bool = Field(
        False, description="after dropping entries, rescale each task vector to its former L1 norm"
    )
    lambda_: float = Field(
        1.0, alias="lambda", description="scale of the merged task vector before it is added to the base"
    )
    int8_mask: bool = Field(
        False, description="MergeKit's memory option for its sign mask; accepted, no numerical effect"
    )


def weighted_sum(deltas, weights: Tensor, *, normalize: bool) -> Tensor:
    """sum_i w_i tau_i, divided by sum_i w_i when ``normalize``.

    Args:
        deltas: an iterable of N task vectors (*shape), consumed one at a time so a
            caller can produce them lazily; each is scaled in place, so pass tensors you own.
        weights: (N,) the models' weights.
        normalize: divide by the weight sum.

    Returns:
        (*shape) the merged task vector.

    Raises:
        MergeError: ``normalize`` is set and the weights sum to zero.
    """
    total = None
    for w, delta in zip(weights.tolist(), deltas):
        # Multiply then add, as MergeKit does, so rounding matches it.
        term = delta.mul_(w)
        total = term if total is None else total.add_(term)
    if normalize:
        total.div_(weight_divisor(weights))
    return total


def add_to_base(base: Tensor, merged_delta: Tensor, lam: float) -> Tensor:
    """theta = theta_base + lambda * tau. ``merged_delta`` is the caller's and is scaled in place."""
    if lam != 1:
        merged_delta.mul_(lam)
    return base + merged_delta


def check_inputs(name: str, x: Tensor, base: Tensor | None, p: PerModel) -> None:
    """Raise MergeError unless there is a base and one parameter set per row of x."""
    if base is None:
        raise MergeError(f"{name} adds task vectors to a base model: set `base_model:` in the recipe")
    if len(p) != len(x):
        raise MergeError(f"{name} got {len(x)} models but {len(p)} parameter sets; pass one per model")


@merge_method(
    "task_arithmetic",
    model_params=TaskArithmeticParams,
    shared_params=TaskArithmeticShared,
    base="required",
    elementwise=True,
    divides_by_weight_sum=True,
    kernel=lazy_kernel("task_arithmetic"),
)
def task_arithmetic(
    x: Tensor, base: Tensor, p: PerModel[TaskArithmeticParams], s: TaskArithmeticShared, gen=None
) -> Tensor:
    """Task arithmetic: add the weighted sum of task vectors to the base.

    theta = theta_base + lambda * sum_i w_i (theta_i - theta_base) / Z,
    Z = sum_i w_i if normalize else 1.
    Ilharco, Ribeiro, Wortsman, Gururangan, Schmidt, Hajishirzi, Farhadi, 2023,
    "Editing Models with Task Arithmetic", arXiv:2212.04089.

    Per-model parameters: weight (required) w_i; density (accepted for MergeKit
    recipes, must be 1). Shared: normalize (False), lambda (1.0), rescale (False;
    a no-op since nothing is dropped), int8_mask (False; no numerical effect).
    FusionBench's TaskArithmeticAlgorithm(scaling_factor=s) is weight 1, lambda s:
    the same tensors bit for bit (tests/fusionbench).

    Args:
        x: (N, *shape) the fine-tuned models' tensors.
        base: (*shape) the base model's tensor.
        p: per-model parameters, one per row of x.
        s: shared parameters.
        gen: unused (the method is deterministic).

    Returns:
        (*shape) the merged weights.
    """
    check_inputs("task_arithmetic", x, base, p)
    # One task vector at a time: memory holds one (*shape) temporary, not N.
    deltas = (row - base for row in x)  # each (*shape)
    merged = weighted_sum(deltas, p.tensor("weight", like=x), normalize=s.normalize)
    return add_to_base(base, merged, s.lambda_)
