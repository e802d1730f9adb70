"""Adapter merges through the engine: one factorize job per adapted module.

The adapters are scanned first (peft_format.scan_adapter: configs, tensor names and shapes, every
check, no factor read). The plan is made from those shapes alone: a job per module of the union of
the adapters' target modules, whose inputs are the lora_A / lora_B tensors of the adapters that
adapt it and whose outputs ``<module>:A`` (k, n) and ``<module>:B`` (m, k) have the rank k the merge
will give (merge.output_rank). engine.run streams each job's factors into its fn, which builds their
LoraLayers and merges them exactly as merge_lora_layers does (merge.merge_module, same parameters,
same seed); the outputs are collected (CollectSink) and the caller writes them as one PEFT adapter
(peft_format.write_adapter), so a failed run writes nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from mergelab.checkpoint.writer import TensorInfo
from mergelab.engine import CollectSink, run
from mergelab.errors import MergeError
from mergelab.lora.merge import (Combine, LayerReport, check_options, in_module, merge_module, module_groups,
                                 module_path, output_rank)
from mergelab.lora.peft_format import AdapterSpec, FactorSpec, LoraLayer
from mergelab.plan import Job, Plan, TensorRef

__all__ = ["adapter_plan", "merge_adapter_files"]

ParamsFor = Callable[[str, list[int]], Mapping[str, Any]]


def _merge_job(module: str, specs: list[FactorSpec], rank_out: int, merge: tuple, facts: dict,
               tensors: list[torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A job's fn: the module's LoraLayers from their factors (A, B per adapter, in the plan's order),
    merged; `facts[module]` gets (path, energy) for the report."""
    layers = [spec.layer(a, b) for spec, a, b in zip(specs, tensors[0::2], tensors[1::2])]
    result, path, energy = merge_module(module, merge[0], layers, *merge[1:])
    if result.rank != rank_out:
        raise AssertionError(f"module {module}: merged to rank {result.rank}, planned {rank_out}")
    facts[module] = (path, energy)
    return {f"{module}:A": result.A, f"{module}:B": result.B}


def adapter_plan(specs: Sequence[AdapterSpec], method: str, *, combine: Combine, rank: int | None,
                 seed: int | None, align: str | None, params: Mapping[str, Any], params_for: ParamsFor | None,
                 facts: dict) -> tuple[Plan, list[tuple[str, list[int], FactorSpec]]]:
    """The engine's plan of an adapter merge, every module's parameters resolved and checked, and per job
    (module, indices of the adapters that adapt it, its first adapter's factors)."""
    check_options(combine, rank, align)
    if combine not in ("svd", "cat"):
        raise MergeError(f"an adapter output is combined by svd or cat, got combine={combine!r}")
    jobs, modules = [], []
    for module, idx, facs, p in module_groups([s.factors for s in specs], params, params_for):
        with in_module(module):
            path = module_path(method, len(idx), p, combine, align)
        f0 = facs[0]
        k = output_rank(path, combine, rank, [f.rank for f in facs], f0.m, f0.n)
        outputs = (TensorInfo(f"{module}:A", (k, f0.n), torch.float32),
                   TensorInfo(f"{module}:B", (f0.m, k), torch.float32))
        inputs = tuple(TensorRef(i, name) for i, f in zip(idx, facs) for name in (f.a_name, f.b_name))
        fn = functools.partial(_merge_job, module, facs, k, (method, p, combine, rank, seed, align), facts)
        jobs.append(Job(name=f"{module}.weight", shape=f0.weight_shape, dtype=torch.float32, inputs=inputs,
                        op="factorize", outputs=outputs, fn=fn))
        modules.append((module, idx, f0))
    return Plan(None, [s.checkpoint for s in specs], jobs), modules


def merge_adapter_files(specs: Sequence[AdapterSpec], method: str, *, combine: Combine = "svd",
                        rank: int | None = None, seed: int | None = None, align: str | None = None,
                        params_for: ParamsFor | None = None, **params: Any
                        ) -> tuple[dict[str, LoraLayer], list[LayerReport]]:
    """Merge scanned adapters through the engine: (module -> merged LoraLayer, per-module reports), the
    numbers merge_lora_layers gives on the read adapters (its arguments, see there)."""
    facts: dict[str, tuple[str, float]] = {}
    plan, modules = adapter_plan(specs, method, combine=combine, rank=rank, seed=seed, align=align,
                                 params=params, params_for=params_for, facts=facts)
    sink = CollectSink()
    run(plan, sink, label="merging adapters")
    layers, reports = {}, []
    for module, idx, f0 in modules:
        a, b = sink.tensors[f"{module}:A"], sink.tensors[f"{module}:B"]
        layers[module] = LoraLayer(module, a, b, f0.weight_shape, f0.layout, f0.embedding)
        path, energy = facts[module]
        reports.append(LayerReport(module, idx, path, a.shape[0], energy))
    return layers, reports
