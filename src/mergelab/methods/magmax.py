"""MagMax: per entry, the task vector of largest magnitude.

Marczak, Twardowski, Trzcinski, Cygert, ECCV 2024, "MagMax: Leveraging Model Merging for Seamless
Continual Learning", arXiv:2407.06322.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from mergelab.methods.kernels import lazy_kernel
from mergelab.methods.registry import MethodParams, NoParams, PerModel, merge_method
from mergelab.methods.task_arithmetic import add_to_base, check_inputs


class MagMaxShared(MethodParams):
    """Shared parameters of magmax."""

    lambda_: float = Field(
        0.5, alias="lambda",
        description="scale of the selected task vector (0.5: the authors' release, FusionBench's default)",
    )


@merge_method("magmax", shared_params=MagMaxShared, base="required", min_models=1, elementwise=True,
              kernel=lazy_kernel("magmax"))
def magmax(x: Tensor, base: Tensor, p: PerModel[NoParams], s: MagMaxShared, gen=None) -> Tensor:
    """MagMax: keep, entry by entry, the task vector of largest magnitude.

    tau_i = theta_i - theta_base;  t*(j) = argmax_i |tau_i[j]|;  theta = theta_base + lambda * tau_{t*(j)}[j].
    Marczak, Twardowski, Trzcinski, Cygert, ECCV 2024, "MagMax: Leveraging Model Merging for Seamless
    Continual Learning", arXiv:2407.06322.

    Ties go to the later model (the models are folded in recipe order with >=, as the authors' code
    and FusionBench's MagMaxAlgorithm do), so a zero task vector never displaces another model's
    zero. Shared: lambda (0.5: the authors' reproduction scripts and FusionBench's default
    scaling_factor). No per-model parameters: the selection is by magnitude alone. Same tensors as
    FusionBench 0.2.33's MagMaxAlgorithm (tests/fusionbench/test_datafree.py). Kernel: one compiled
    pass from the inputs as stored (methods/kernels/magmax.py), the same numbers.

    Args:
        x: (N, *shape) the fine-tuned models' tensors.
        base: (*shape) the base model's tensor.
        p: unused (no per-model parameters).
        s: shared parameters.
        gen: unused (deterministic).

    Returns:
        (*shape) the merged weights.
    """
    check_inputs("magmax", x, base, p)
    best = x[0] - base  # (*shape) the running selection
    for row in x[1:]:
        tau = row - base
        best = torch.where(tau.abs() >= best.abs(), tau, best)
    return add_to_base(base, best, s.lambda_)
