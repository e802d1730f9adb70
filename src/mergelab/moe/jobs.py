"""The jobs of an MoE checkpoint: a Plan that engine.run streams into a FolderSink.

In output order: every base tensor outside the MLPs (copy jobs), Qwen2-MoE's missing q/k/v
biases (zeros), then per layer its routers and one expert job per expert (op "expert": the
expert's three MLP matrices, renamed into the MoE layout, with its noise_scale / residual_scale;
fused, one job filling the layer's stacked tensors expert by expert). Memory holds one expert's
MLP of one layer (fused: the layer's stacked output tensors, which the engine writes whole).
"""

from __future__ import annotations

import functools
import re

import torch
from torch import Tensor

from mergelab.checkpoint.reader import Checkpoint
from mergelab.checkpoint.writer import TensorInfo
from mergelab.errors import NonFiniteError
from mergelab.methods.kernels import has_nonfinite
from mergelab.methods.seeding import make_generator
from mergelab.moe.arch import expert_names, router_names
from mergelab.moe.config import MoEPlan
from mergelab.plan import Job, OutputSpec, Plan, TensorRef

__all__ = ["moe_jobs", "refuse_nonfinite", "finite"]

_MLP = re.compile(r"^model\.layers\.\d+\.mlp\.")
_PROJS = ("gate_proj", "up_proj", "down_proj")


def finite(t: Tensor, what: str) -> Tensor:
    """`t`, or NonFiniteError naming `what`: an MoE built from NaN/Inf weights would be silently broken."""
    if has_nonfinite(t):
        raise _nonfinite(what)
    return t


def _nonfinite(what: str) -> NonFiniteError:
    return NonFiniteError(f"{what} holds NaN or Inf values; nothing was written. Repair or leave out that "
                          "model (or, for noise_scale / residual_scale, use smaller numbers or a wider dtype)")


def refuse_nonfinite(plan: Plan):
    """The run's observe callback: an input holding NaN/Inf stops the build, naming tensor and checkpoint."""
    def observe(job: Job, rows, tensors, bad: list[TensorRef]) -> None:
        if bad:
            raise _nonfinite(f"tensor {bad[0].name} of {plan.checkpoints[bad[0].model].path}")
    return observe


def _missing_biases(base: Checkpoint, layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """Qwen2-MoE's q/k/v biases that a Llama/Mistral base lacks: zeros, an exact no-op (as mergekit)."""
    out = []
    for layer in range(layers):
        for p in ("q_proj", "k_proj", "v_proj"):
            prefix = f"model.layers.{layer}.self_attn.{p}"
            if f"{prefix}.bias" not in base:
                out.append((f"{prefix}.bias", (base.shape(f"{prefix}.weight")[0],)))
    return out


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, tensors: list[Tensor], device: torch.device) -> Tensor:
    return torch.zeros(shape, dtype=dtype)


def _routers(gates: dict[str, Tensor], dtype: torch.dtype, tensors: list[Tensor],
             device: torch.device) -> dict[str, Tensor]:
    return {name: g.to(dtype) for name, g in gates.items()}


def _expert_matrices(mats: list[Tensor], layer: int, entry, seed: int | None, tag: str,
                     dtype: torch.dtype) -> dict[str, Tensor]:
    """One expert's three MLP matrices of one layer (as stored), with its noise_scale / residual_scale, in `dtype`."""
    out = {}
    for proj, t in zip(_PROJS, mats):
        name = f"model.layers.{layer}.mlp.{proj}.weight"
        if entry.noise_scale or (entry.residual_scale is not None and proj == "down_proj"):
            t = t.float()
            if entry.noise_scale:
                gen = make_generator(seed, f"{tag}.layers.{layer}.{proj}", torch.device("cpu"))
                t = t + torch.randn(t.shape, generator=gen) * entry.noise_scale
            if entry.residual_scale is not None and proj == "down_proj":
                t = t * entry.residual_scale
        out[proj] = finite(t.to(dtype), f"expert {tag}'s {name} after noise_scale / residual_scale")
    return out


def _expert(experts: list[tuple], layer: int, seed: int | None, dtype: torch.dtype, names: dict[str, str],
            tensors: list[Tensor], device: torch.device) -> dict[str, Tensor]:
    """An expert job's fn: each of `experts` ((tag, entry, path)) has three inputs (gate, up, down);
    one expert's matrices are renamed, several (fused) filled one expert at a time into
    gate_up (E, 2I, H) = [gate; up] and down (E, H, I)."""
    if "gate_up" not in names:
        (tag, entry, _), = experts
        mats = _expert_matrices(tensors, layer, entry, seed, tag, dtype)
        return {name: mats[proj] for proj, name in names.items()}
    (inter, hidden), count = tensors[0].shape, len(experts)
    gate_up = torch.empty((count, 2 * inter, hidden), dtype=dtype)
    down = torch.empty((count, hidden, inter), dtype=dtype)
    for i, (tag, entry, _) in enumerate(experts):
        mats = _expert_matrices(tensors[3 * i:3 * i + 3], layer, entry, seed, tag, dtype)
        gate_up[i, :inter], gate_up[i, inter:], down[i] = mats["gate_proj"], mats["up_proj"], mats["down_proj"]
    return {names["gate_up"]: gate_up, names["down"]: down}


class _Jobs:
    """The jobs of one MoE, in output order (see the module docstring)."""

    def __init__(self, plan: MoEPlan, checkpoints: list[Checkpoint], dtype: torch.dtype, fused: bool,
                 seed: int | None):
        self.plan, self.ckpts, self.dtype, self.fused, self.seed = plan, checkpoints, dtype, fused, seed
        self.index = {ck.path: i for i, ck in enumerate(checkpoints)}
        self.jobs: list[Job] = []

    def infos(self, names: dict[str, str]) -> tuple[TensorInfo, ...]:
        H, I, E = self.plan.hidden_size, self.plan.intermediate_size, len(self.plan.config.experts)
        shapes = {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I), "gate_up": (E, 2 * I, H),
                  "down": (E, H, I)}
        return tuple(TensorInfo(n, shapes[k], self.dtype) for k, n in names.items())

    def base(self) -> list[str]:
        """Copy jobs for the base's tensors outside the MLPs (and zero biases); returns those left out."""
        base, dtype = self.ckpts[0], self.dtype
        self.jobs += [Job(name=n, shape=base.shape(n), dtype=dtype, inputs=(TensorRef(0, n),), op="copy")
                      for n in base if not _MLP.match(n)]
        if self.plan.output == "Qwen MoE":
            self.jobs += [Job(name=n, shape=shape, dtype=dtype, inputs=(), op="expert",
                              fn=functools.partial(_zeros, shape, dtype))
                          for n, shape in _missing_biases(base, self.plan.num_layers)]
        return [n for n in base if _MLP.match(n)]

    def routers(self, layer: int, routed: Tensor, shared: Tensor | None) -> None:
        router, shared_gate = router_names(self.plan.output, layer, self.fused)
        gates = {router: routed[layer]}
        infos = [TensorInfo(router, (len(self.plan.config.experts), self.plan.hidden_size), self.dtype)]
        if shared_gate:
            gates[shared_gate] = shared[layer]
            infos.append(TensorInfo(shared_gate, (1, self.plan.hidden_size), self.dtype))
        self.jobs.append(Job(name=router, shape=(), dtype=self.dtype, inputs=(), op="expert", outputs=tuple(infos),
                             fn=functools.partial(_routers, gates, self.dtype)))

    def experts(self, layer: int, experts: list[tuple], names: dict[str, str]) -> None:
        """One job writing `names` from `experts` ((tag, entry, path)), each read from its checkpoint."""
        refs = tuple(TensorRef(self.index[path], f"model.layers.{layer}.mlp.{proj}.weight")
                     for _, _, path in experts for proj in _PROJS)
        self.jobs.append(Job(name=next(iter(names.values())), shape=(), dtype=self.dtype, inputs=refs, op="expert",
                             outputs=self.infos(names),
                             fn=functools.partial(_expert, experts, layer, self.seed, self.dtype, names)))

    def layer(self, layer: int) -> None:
        plan = self.plan
        routed = [(f"experts.{i}", e, p) for i, (e, p) in enumerate(zip(plan.config.experts, plan.experts))]
        if self.fused:
            self.experts(layer, routed, expert_names(plan.output, layer, 0, True))
        else:
            for i, entry in enumerate(routed):
                self.experts(layer, [entry], expert_names(plan.output, layer, i, False))
        for e, p in zip(plan.config.shared_experts or [], plan.shared):
            self.experts(layer, [("shared_expert", e, p)], expert_names(plan.output, layer, None, False))


def moe_jobs(plan: MoEPlan, checkpoints: list[Checkpoint], dtype: torch.dtype, fused: bool, routed: Tensor,
             shared: Tensor | None, seed: int | None) -> tuple[Plan, list[str]]:
    """(the plan writing the MoE, the base tensors left out: its dense MLPs).

    checkpoints: the base first, then every other expert model once (their paths as in `plan`).
    routed, shared: the (L, E, H) and (L, S, H) router weights (compute_gates).
    """
    jobs = _Jobs(plan, checkpoints, dtype, fused, seed)
    dropped = jobs.base()
    for layer in range(plan.num_layers):
        jobs.routers(layer, routed, shared)
        jobs.layer(layer)
    left_out = [(str(checkpoints[0].path), n, "a dense MLP tensor of the base: experts replace it") for n in dropped]
    return Plan(None, checkpoints, jobs.jobs, left_out, OutputSpec(assets_from=checkpoints[0])), dropped
