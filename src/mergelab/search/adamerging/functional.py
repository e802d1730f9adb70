"""The merged model as a function of its merging coefficients (AdaMerging's objective's model).

theta(lambda) = theta_base + sum_k lambda_k tau_k,  tau_k = theta_k - theta_base,

with one lambda_k per task (task-wise) or one per task and parameter tensor
(layer-wise: lambda has shape (K, P) over the P trainable parameter tensors, in
the order of the base module's named_parameters(), FusionBench's layer-wise
granularity). The forward pass runs the base module with theta(lambda) through
torch.func.functional_call, so gradients reach lambda and nothing is copied into
the module. Buffers and parameters with requires_grad=False keep the base's values,
as in FusionBench's TaskWiseMergedModel / LayerWiseMergedModel.

The sum is formed as mergelab's task_arithmetic forms it (each tau_k times its
weight, added up in order, then added to the base), so the recipe written from the
learned lambda (mergelab.search.adamerging.recipe) merges to the same float32 numbers.
FusionBench adds each weighted task vector to the base in turn; the two orders
differ by float32 rounding only. Tied tensors (an LM head tied to the embeddings) are one
parameter, merged once, and the head follows it, as in the saved model; FusionBench's
wrappers hand both names to functional_call, which refuses them (tie_weights=True).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mergelab.errors import MergeError

GRANULARITIES = ("task", "layer")


def _state(model: nn.Module | Mapping[str, Tensor], what: str) -> Mapping[str, Tensor]:
    if isinstance(model, nn.Module):
        return model.state_dict()
    if isinstance(model, Mapping):
        return model
    raise MergeError(f"{what} is a {type(model).__name__}; give an nn.Module or a state dict")


class MergedFunction:
    """theta(lambda) over a template module, and the module's forward at theta(lambda).

    Args:
        module: the base model (its architecture runs every forward; its parameters
            are theta_base unless `base` is given). Not modified.
        models: the K fine-tuned models (nn.Modules or state dicts keyed like `module`'s).
        granularity: "task" (lambda: (K,)) or "layer" (lambda: (K, P)).
        base: the base weights, when they are not `module`'s own (a state dict or module).
    """

    def __init__(self, module: nn.Module, models: Sequence[nn.Module | Mapping[str, Tensor]], *,
                 granularity: str = "task", base: nn.Module | Mapping[str, Tensor] | None = None):
        if granularity not in GRANULARITIES:
            raise MergeError(f"granularity {granularity!r} is not one of {', '.join(GRANULARITIES)}",
                             option="granularity")
        if not models:
            raise MergeError("AdaMerging needs at least one fine-tuned model")
        self.module = module
        self.granularity = granularity
        base_state = _state(base if base is not None else module, "base")
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        self.base = {n: self._get(base_state, n, "the base model").detach().float() for n in self.names}
        self.task_vectors = []
        for k, m in enumerate(models):
            st = _state(m, f"models[{k}]")
            self.task_vectors.append({n: self._get(st, n, f"models[{k}]").detach().float() - self.base[n]
                                      for n in self.names})
        for n in self.names:
            shapes = {tuple(tv[n].shape) for tv in self.task_vectors} | {tuple(self.base[n].shape)}
            if len(shapes) > 1:
                raise MergeError(f"tensor {n} has different shapes across the models: {sorted(shapes)}")
        # Buffers and frozen parameters: the base's values, fixed.
        frozen = {n: t for n, t in module.named_buffers()}
        frozen.update({n: p for n, p in module.named_parameters() if not p.requires_grad})
        self.fixed = {n: (base_state[n] if n in base_state else t).detach() for n, t in frozen.items()}

    def to(self, device: torch.device | str) -> "MergedFunction":
        """Move the base, the task vectors and the fixed tensors to `device` (the module itself stays put:
        functional_call replaces every one of its tensors)."""
        self.base = {n: t.to(device) for n, t in self.base.items()}
        self.task_vectors = [{n: t.to(device) for n, t in tv.items()} for tv in self.task_vectors]
        self.fixed = {n: t.to(device) for n, t in self.fixed.items()}
        return self

    @staticmethod
    def _get(state: Mapping[str, Tensor], name: str, what: str) -> Tensor:
        if name not in state:
            raise MergeError(f"{what} has no tensor {name!r} (a parameter of the base model); give models of "
                             "one architecture")
        return state[name]

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of lambda: (K,) task-wise, (K, P) layer-wise."""
        k = len(self.task_vectors)
        return (k,) if self.granularity == "task" else (k, len(self.names))

    def init(self, value: float = 0.3) -> Tensor:
        """lambda filled with `value` (FusionBench's init_values; its AdaMerging configurations use 0.3)."""
        return torch.full(self.shape, float(value), dtype=torch.float32)

    def params(self, lam: Tensor) -> dict[str, Tensor]:
        """theta(lambda): name -> merged parameter (differentiable in lam)."""
        if tuple(lam.shape) != self.shape:
            raise MergeError(f"lambda has shape {tuple(lam.shape)}; this {self.granularity}-wise merge of "
                             f"{len(self.task_vectors)} models needs {self.shape}")
        out = {}
        for i, n in enumerate(self.names):
            total = None
            for k, tv in enumerate(self.task_vectors):
                w = lam[k] if self.granularity == "task" else lam[k, i]
                term = tv[n] * w
                total = term if total is None else total + term
            out[n] = self.base[n] + total
        return out

    def forward(self, lam: Tensor, batch: Any) -> Any:
        """The module's output on `batch` (a tensor, a tuple of positional inputs, or a dict of keyword
        inputs) with theta(lambda) as its parameters."""
        return self.run(self.params(lam), batch)

    def run(self, params: Mapping[str, Tensor], batch: Any) -> Any:
        """The module's output on `batch` with `params` (from .params) as its parameters."""
        args, kwargs = split_batch(batch)
        return torch.func.functional_call(self.module, {**self.fixed, **params}, args, kwargs,
                                          tie_weights=True, strict=False)

    def coefficients(self, lam: Tensor) -> dict[str, list[float]]:
        """Tensor name -> the K coefficients it is merged with (task-wise: the same K for every tensor)."""
        lam = lam.detach().float()
        return {n: [float(lam[k] if self.granularity == "task" else lam[k, i]) for k in range(len(lam))]
                for i, n in enumerate(self.names)}

    def aliases(self) -> dict[str, str]:
        """Tied names (e.g. lm_head.weight tied to the embeddings) -> the parameter name they share."""
        first: dict[int, str] = {}
        out = {}
        for n, p in self.module.named_parameters(remove_duplicate=False):
            key = id(p)
            if key in first and first[key] != n:
                out[n] = first[key]
            else:
                first.setdefault(key, n)
        return out


def to_device(batch: Any, device: torch.device | str) -> Any:
    """`batch` (a tensor, tuple/list or dict of them) with its tensors on `device`."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def split_batch(batch: Any) -> tuple[tuple, dict]:
    """A batch as (positional, keyword) inputs: a dict is keyword inputs, a tuple/list positional, else one input."""
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}
