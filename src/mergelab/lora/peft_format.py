"""PEFT LoRA adapters: their factors as mergelab's LoraLayers, read from and written to adapter folders.

A PEFT adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors``
(or ``adapter_model.bin``). Each adapted module ``M`` stores two factors,

    base_model.model.M.lora_A.weight   (r, in[, k...])      lora_embedding_A: (r, vocab)
    base_model.model.M.lora_B.weight   (out, r[, 1...])     lora_embedding_B: (dim, r)

and the module's weight changes by ``delta = s * B @ A`` with ``s = alpha / r``
(``alpha / sqrt(r)`` for rsLoRA, Kalajdzievski 2023, arXiv:2312.03732), where r and
alpha may be overridden per module by ``rank_pattern`` / ``alpha_pattern``.

Here every adapted layer becomes a `LoraLayer` holding the update as the product
of two plain matrices, ``delta2d = B2 @ A2`` with B2 (m, r) and A2 (r, n) in
float32 and the scale folded into B2, plus the map from that (m, n) matrix to the
stored weight's shape: the identity (Linear), a reshape (Conv1d/2d/3d) or a
transpose (GPT-2 Conv1D with fan_in_fan_out, embeddings).

An adapter is first scanned (`scan_adapter`: its config and its tensors' names and shapes, every
check made, no factor read), then read (`read_adapter`, whole) or streamed by the engine (the
adapter merge, mergelab.lora.adapter_run). The folder's files themselves are found, read and
written by mergelab.checkpoint (peft, and Checkpoint(folder, adapter=True)).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from mergelab.checkpoint.peft import is_adapter_folder as is_peft_adapter
from mergelab.checkpoint.peft import read_adapter_config, write_adapter_folder
from mergelab.checkpoint.reader import Checkpoint
from mergelab.errors import CheckpointError

__all__ = ["AdapterInfo", "AdapterSpec", "FactorSpec", "LoraLayer", "is_peft_adapter", "read_adapter", "scan_adapter",
           "write_adapter", "PREFIX"]

PREFIX = "base_model.model."
_FACTOR = re.compile(r"^(?P<module>.+)\.(?P<which>lora_A|lora_B)\.weight$|"
                     r"^(?P<emodule>.+)\.(?P<ewhich>lora_embedding_A|lora_embedding_B)$")

Layout = Literal["matrix", "transposed", "conv"]


@dataclasses.dataclass
class LoraLayer:
    """One adapted module's update, ``delta2d = B @ A`` (scale folded into B).

    Attributes:
        module: the module's name in the base model (``model.layers.0.self_attn.q_proj``).
        A: (r, n) float32.  B: (m, r) float32, already multiplied by the LoRA scale.
        weight_shape: shape of the module's stored weight.
        layout: how (m, n) maps onto weight_shape: "matrix" (equal), "transposed"
            (weight = delta2d.T: fan_in_fan_out, embeddings), "conv" (weight =
            delta2d.reshape(weight_shape), m = out channels).
    """

    module: str
    A: torch.Tensor
    B: torch.Tensor
    weight_shape: tuple[int, ...]
    layout: Layout
    embedding: bool = False  # stored as lora_embedding_A/B

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def weight_name(self) -> str:
        return f"{self.module}.weight"

    def to_weight(self, delta2d: torch.Tensor) -> torch.Tensor:
        """(m, n) matrix -> the stored weight's shape."""
        if self.layout == "transposed":
            return delta2d.T
        return delta2d.reshape(self.weight_shape)

    def delta(self) -> torch.Tensor:
        """The dense update in the stored weight's shape (float32)."""
        return self.to_weight(self.B @ self.A)

    def delta_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop (dim 0 of the stored weight) of the update, without forming the rest."""
        if self.layout == "transposed":
            return (self.B @ self.A[:, start:stop]).T
        return (self.B[start:stop] @ self.A).reshape(stop - start, *self.weight_shape[1:])


@dataclasses.dataclass
class AdapterInfo:
    """A read adapter: its folder, config and layers (module name -> LoraLayer)."""

    path: Path
    config: dict[str, Any]
    layers: dict[str, LoraLayer]

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")


@dataclasses.dataclass(frozen=True)
class FactorSpec:
    """One adapted module as its adapter file stores it, known from names and shapes alone.

    `layer(a, b)` turns the two stored tensors into the module's LoraLayer.
    """

    module: str
    a_name: str  # the stored tensor names of lora_A / lora_B (lora_embedding_A / _B)
    b_name: str
    rank: int
    scale: float  # alpha / r, or alpha / sqrt(r) (rsLoRA)
    weight_shape: tuple[int, ...]
    layout: Layout
    embedding: bool

    @property
    def m(self) -> int:
        """Rows of the (m, n) update matrix B @ A."""
        return self.weight_shape[1] if self.layout == "transposed" else self.weight_shape[0]

    @property
    def n(self) -> int:
        return math.prod(self.weight_shape) // self.m

    def layer(self, a: torch.Tensor, b: torch.Tensor) -> LoraLayer:
        """The LoraLayer of stored factors `a`, `b` (any float dtype): float32, scale folded into B."""
        r = self.rank
        a2 = a.reshape(r, -1).to(torch.float32, copy=True)  # (r, n), owned (not a view of a mapped file)
        b2 = b.reshape(b.shape[0], r).to(torch.float32) * self.scale  # (m, r)
        return LoraLayer(self.module, a2, b2, self.weight_shape, self.layout, self.embedding)


@dataclasses.dataclass
class AdapterSpec:
    """A scanned adapter: its folder, config, adapted modules and its opened file, no factor read yet."""

    path: Path
    config: dict[str, Any]
    factors: dict[str, FactorSpec]  # module -> its factors
    checkpoint: Checkpoint  # the adapter's weight file (Checkpoint(path, adapter=True))

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")


# -- reading --------------------------------------------------------------------------------


def _pattern_value(patterns: Mapping[str, Any] | None, module: str, default: Any) -> Any:
    # PEFT's own matching (utils.other.get_pattern_key): a key matches the module name or a dotted suffix.
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _refusals(config: Mapping[str, Any], path: Path) -> list[str]:
    out = []
    kind = config.get("peft_type", "LORA")
    if str(kind).upper() != "LORA":
        out.append(f"it is a {kind} adapter; only LoRA adapters are supported")
    if config.get("use_dora"):
        out.append("it is a DoRA adapter (use_dora: true): its magnitude vector rescales each column of "
                   "W + BA, so it is not an additive low-rank update; merge it into its model first "
                   "(peft's merge_and_unload) and merge full models")
    if config.get("lora_bias"):
        out.append("it trains biases (lora_bias: true); merge it into its model first")
    for key in ("use_qalora", "target_parameters"):
        if config.get(key):
            out.append(f"{key} adapters are not supported")
    return [f"{path}: {o}" for o in out]


def scan_adapter(path: str | os.PathLike, weight_shapes: Mapping[str, tuple[int, ...]] | None = None
                 ) -> AdapterSpec:
    """Check a PEFT LoRA adapter folder from its config and its tensors' names and shapes (no factor is read).

    Args:
        path: the adapter folder.
        weight_shapes: module weight name -> shape in the base model. When given,
            every adapted module must exist there with a shape its factors fit;
            without it the shape is inferred from the factors (Linear, Conv1D with
            fan_in_fan_out, embeddings; convolutions need the base's shapes).

    Raises:
        CheckpointError: naming the folder and what cannot be merged exactly.
    """
    path = Path(path).expanduser()
    config = read_adapter_config(path)
    problems = _refusals(config, path)
    if problems:
        raise CheckpointError("\n".join(problems))
    ck = Checkpoint(path, adapter=True)
    try:
        factors = _factor_specs(path, config, ck, weight_shapes)
    except BaseException:
        ck.close()
        raise
    return AdapterSpec(path, config, factors, ck)


def _factor_specs(path: Path, config: Mapping[str, Any], ck: Checkpoint,
                  weight_shapes: Mapping[str, tuple[int, ...]] | None) -> dict[str, FactorSpec]:
    names: dict[str, dict[str, str]] = {}
    others, embeddings = [], set()
    for key in ck:
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        m = _FACTOR.match(name)
        if m is None:
            others.append(key)
            continue
        module = m.group("module") or m.group("emodule")
        which = (m.group("which") or m.group("ewhich"))[-1]
        names.setdefault(module, {})[which] = key
        if m.group("emodule"):
            embeddings.add(module)
    if others:
        raise CheckpointError(f"{path}: holds {len(others)} tensor(s) that are not LoRA factors (first "
                              f"{others[0]}: modules_to_save, DoRA magnitudes or biases); they cannot be "
                              "merged as low-rank updates; merge this adapter into its model first")
    factors = {}
    for module, ab in sorted(names.items()):
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{path}: module {module} has lora_{next(iter(ab))} but not its partner; "
                                  "the adapter file is damaged")
        factors[module] = _factor_spec(path, config, module, ab, ck.shape(ab["A"]), ck.shape(ab["B"]),
                                       weight_shapes, module in embeddings)
    return factors


def read_adapter(path: str | os.PathLike, weight_shapes: Mapping[str, tuple[int, ...]] | None = None) -> AdapterInfo:
    """Read a PEFT LoRA adapter folder into float32 factors with the scale folded into B (checked as
    scan_adapter checks it; see there for `weight_shapes`).

    Raises:
        CheckpointError: naming the folder and what cannot be merged exactly.
    """
    spec = scan_adapter(path, weight_shapes)
    with spec.checkpoint as ck:
        layers = {module: f.layer(ck[f.a_name], ck[f.b_name]) for module, f in spec.factors.items()}
    return AdapterInfo(spec.path, spec.config, layers)


def _factor_spec(path: Path, config: Mapping[str, Any], module: str, names: Mapping[str, str],
                 a: tuple[int, ...], b: tuple[int, ...], weight_shapes: Mapping[str, tuple[int, ...]] | None,
                 embedding: bool) -> FactorSpec:
    """The module's factors from their stored shapes `a` (lora_A) and `b` (lora_B), checked."""
    r = a[0]
    alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    if b[1] != r:
        raise CheckpointError(f"{path}: module {module}: lora_B has {b[1]} input channels for rank {r} "
                              "(grouped convolutions are not supported)")
    want = weight_shapes.get(f"{module}.weight") if weight_shapes is not None else None
    if weight_shapes is not None and want is None:
        raise CheckpointError(f"{path}: adapts module {module}, which the base model lacks "
                              f"(no tensor {module}.weight); is this adapter for another base model?")
    m, n = b[0], math.prod(a[1:])
    if len(a) > 2:
        layout, shape = "conv", (m, *a[1:])
    elif embedding or _transposed(config, want, m, n):
        layout, shape = "transposed", (n, m)
    else:
        layout, shape = "matrix", (m, n)
    if want is not None and tuple(want) != shape:
        raise CheckpointError(f"{path}: module {module}: the update has shape {shape}, the base's "
                              f"{module}.weight has {tuple(want)}; is this adapter for another base model?")
    return FactorSpec(module, names["A"], names["B"], r, scale, tuple(shape), layout, embedding)


def _transposed(config: Mapping[str, Any], want: tuple[int, ...] | None, m: int, n: int) -> bool:
    # PEFT saves one fan_in_fan_out for the whole adapter (it turns it on as soon as one GPT-2
    # Conv1D is targeted, even beside nn.Linear layers), so the base's weight shape decides
    # where it can; only a square weight falls back to the config's flag.
    if want is not None and m != n:
        return tuple(want) == (n, m)
    return bool(config.get("fan_in_fan_out"))


# -- writing --------------------------------------------------------------------------------


def write_adapter(out: str | os.PathLike, layers: Mapping[str, LoraLayer], *, base_model: str | None,
                  extra_config: Mapping[str, Any] | None = None,
                  modules_to_save: Mapping[str, torch.Tensor] | None = None, overwrite: bool = False,
                  dtype: torch.dtype = torch.float32, extra_files: Mapping[str, str] | None = None,
                  protected: Sequence[str | os.PathLike] = ()) -> Path:
    """Write `layers` as a PEFT adapter folder that ``PeftModel.from_pretrained`` loads.

    The scale is folded into B, so lora_alpha = r for every module (s = 1); ranks
    that differ between modules go to ``rank_pattern``/``alpha_pattern``. Written
    into a temporary folder beside `out` and renamed into place.

    Args:
        modules_to_save: full tensors (base-model names, e.g. ``model.norm.weight``)
            stored for PEFT's modules_to_save.
        extra_files: file name -> text written beside the weights (reports).
    """
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; choose another output folder or allow overwriting")
    if not layers and not modules_to_save:
        raise CheckpointError(f"{out}: nothing to write: no adapted layer")
    ranks = {name: layer.rank for name, layer in layers.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count) if ranks else 1
    pattern = {re.escape(name): k for name, k in ranks.items() if k != r}
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        k = layer.rank
        if layer.layout == "conv":
            nd = len(layer.weight_shape) - 2
            a = layer.A.reshape(k, *layer.weight_shape[1:])
            b = layer.B.reshape(layer.B.shape[0], k, *([1] * nd))
        else:
            a, b = layer.A, layer.B
        if layer.embedding:
            tensors[f"{PREFIX}{name}.lora_embedding_A"] = a.to(dtype).contiguous()
            tensors[f"{PREFIX}{name}.lora_embedding_B"] = b.to(dtype).contiguous()
        else:
            tensors[f"{PREFIX}{name}.lora_A.weight"] = a.to(dtype).contiguous()
            tensors[f"{PREFIX}{name}.lora_B.weight"] = b.to(dtype).contiguous()
    save_modules = sorted({n.rsplit(".", 1)[0] for n in (modules_to_save or {})})
    for n, t in (modules_to_save or {}).items():
        module, leaf = n.rsplit(".", 1)
        tensors[f"{PREFIX}{module}.{leaf}"] = t.contiguous()
    fan_in_fan_out = any(layer.layout == "transposed" and not layer.embedding for layer in layers.values())
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model,
        "r": r, "lora_alpha": r, "use_rslora": False, "use_dora": False, "lora_dropout": 0.0,
        "bias": "none", "fan_in_fan_out": fan_in_fan_out, "init_lora_weights": True,
        "target_modules": sorted(layers), "rank_pattern": pattern,
        "alpha_pattern": dict(pattern), "modules_to_save": save_modules or None,
        "inference_mode": True,
    }
    config.update(extra_config or {})
    write_adapter_folder(out, config, tensors, overwrite, extra_files or {}, protected)
    return out
