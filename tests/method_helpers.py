"""Helpers shared by the method tests: call a method as the engine does, or MergeKit's on the same tensors."""

import pytest
import torch

from mergelab.methods import PerModel, get_method, run_method


def merge(name, models, base=None, model_params=None, **shared):
    """Call a registered method the way the engine does (run_method); model_params: one dict per model."""
    spec = get_method(name)
    xs = list(models)
    rows = model_params or [{}] * len(xs)
    p = PerModel([spec.model_params(**row) for row in rows])
    cdtype = torch.float64 if xs[0].dtype == torch.float64 else torch.float32
    return run_method(spec, xs, base, p, spec.shared_params(**shared), None, out_dtype=cdtype, compute_dtype=cdtype)


def mergekit(name, tensors, base_index=None, **params):
    """MergeKit 0.1.5's method on the same tensors (base_index: which tensor is the base)."""
    pytest.importorskip("mergekit", reason="mergekit is the reference (pip install mergelab[bench])")
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    group = TensorGroup.from_tensors([t.clone() for t in tensors], base_index=base_index)
    return registry.get(name)([group], parameters=params)[0]


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def weights(*ws):
    return [{"weight": w} for w in ws]
