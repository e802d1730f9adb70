"""mergekit-moe's config format, read and checked completely before any work.

    base_model: ./base                 # attention, embeddings, norms; its hidden states make the gates
    gate_mode: hidden                  # hidden | hidden_avg | cheap_embed | random | uniform_random
    dtype: bfloat16
    experts_per_token: 2
    experts:
      - source_model: ./math-ft        # its MLPs become expert 0 of every layer
        positive_prompts: ["solve 3 + 4"]
        negative_prompts: ["a recipe for bread"]    # optional
        noise_scale: 0.01               # optional: N(0, s^2) added to the expert's MLP weights
        residual_scale: 0.5             # optional: scales the expert's down_proj
    shared_experts:                    # optional; asks for a Qwen2-MoE output (exactly one)
      - source_model: ./base
        positive_prompts: ["..."]
    architecture: mixtral              # optional: mixtral | qwen (mergekit's prefix match)

`load_moe_config` returns a validated `MoEConfig` (paths resolved, every
model opened header-only and checked against the others) or raises one
RecipeError listing every problem, each naming its field.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from mergelab.checkpoint.reader import Checkpoint, parse_dtype
from mergelab.errors import MergeError, RecipeError
from mergelab.recipe.params import suggest

__all__ = ["ExpertEntry", "MoEConfig", "MoEPlan", "load_moe_config", "GATE_MODES"]

# mergekit 0.1.5's gate modes; "hidden" and "hidden_last" take each prompt's last token,
# "hidden_avg" the mean over its tokens (see gates.py).
GATE_MODES = ("hidden", "hidden_last", "hidden_avg", "cheap_embed", "random", "uniform_random")
PROMPTED = ("hidden", "hidden_last", "hidden_avg", "cheap_embed")
# Output architectures: mergekit's names; `architecture:` selects by case-insensitive prefix, as mergekit does.
OUTPUTS = {"Mixtral": ("llama", "mistral"), "DeepSeek MoE": None, "Qwen MoE": ("llama", "mistral", "qwen2"),
           "Qwen3 MoE": None}
MAX_CONFIG_BYTES = 1024 * 1024


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExpertEntry(_Strict):
    source_model: str
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    noise_scale: float | None = None
    residual_scale: float | None = None


class MoEConfig(_Strict):
    base_model: str | None = None
    experts: list[ExpertEntry] | None = None
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    shared_experts: list[ExpertEntry] | None = None
    architecture: str | None = None


@dataclasses.dataclass
class MoEPlan:
    """A checked config: resolved paths, the output architecture, the models' shared shapes."""

    config: MoEConfig
    text: str                      # the config as written (copied into the output)
    base: Path
    experts: list[Path]
    shared: list[Path]
    output: str                    # "Mixtral" or "Qwen MoE"
    base_config: dict[str, Any]
    dtype: torch.dtype | None      # None: the base's own dtype (known once it is open)
    hidden_size: int
    intermediate_size: int
    num_layers: int

    @property
    def all_experts(self) -> list[ExpertEntry]:
        return list(self.config.experts or []) + list(self.config.shared_experts or [])


ALL_SAME_FIX = "list different models (or set allow_all_same=True)"


def load_moe_config(path: str | Path, *, allow_all_same: bool = False) -> MoEPlan:
    """Read `path` (mergekit-moe YAML) and check it and every model it names.

    Raises:
        RecipeError: every problem found, one line each, naming the field at fault.
    """
    path = Path(path)
    text = _read_text(path)
    name = path.name
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"not valid YAML: {str(exc)[:300]}", name) from None
    if not isinstance(data, dict):
        raise RecipeError("a mergekit-moe config is a mapping with at least `base_model` and `experts`", name)
    try:
        config = MoEConfig.model_validate(data)
    except ValidationError as exc:
        raise RecipeError([_schema_message(e) for e in exc.errors()], name) from None
    problems = field_problems(config, allow_all_same=allow_all_same)
    output = select_output(config, problems)
    if problems:
        all_same = any(p.endswith(ALL_SAME_FIX) for p in problems)
        raise RecipeError(problems, name, option="allow_all_same" if all_same else None)
    base = resolve(config.base_model, path.parent)
    experts = [resolve(e.source_model, path.parent) for e in config.experts]
    shared = [resolve(e.source_model, path.parent) for e in config.shared_experts or []]
    refs = [("base_model", base)] + [(f"experts[{i}].source_model", p) for i, p in enumerate(experts)]
    refs += [(f"shared_experts[{i}].source_model", p) for i, p in enumerate(shared)]
    plan = _model_problems(config, text, refs, output, problems)
    if problems:
        raise RecipeError(problems, name)
    return plan


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise RecipeError(f"config file {path} does not exist; check the path")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise RecipeError(f"config file {path} is over {MAX_CONFIG_BYTES // 1024} KB; is this the right file?")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"config file {path} is not UTF-8 text ({exc.reason}); save it as UTF-8") from None


def _field(loc: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(loc))


def _schema_message(err: dict) -> str:
    loc, path = err["loc"], _field(err["loc"])
    if err["type"] == "extra_forbidden":
        owner = ExpertEntry if any(p in ("experts", "shared_experts") for p in loc[:-1]) else MoEConfig
        names = list(owner.model_fields)
        return f"{path} is not a mergekit-moe field{suggest(str(loc[-1]), names)}; fields here: {', '.join(names)}"
    if err["type"] == "missing":
        return f"{path} is missing; add it"
    return f"{path}: {str(err.get('input'))[:200]!r} is not valid: {err['msg']}"


def field_problems(config: MoEConfig, *, allow_all_same: bool = False) -> list[str]:
    """Problems of the config's own fields (no file is opened)."""
    out: list[str] = []
    if not config.base_model:
        out.append("base_model is missing; add `base_model: PATH`, the model whose attention, embeddings and "
                   "norms the MoE keeps and whose hidden states make the gates")
    experts = config.experts or []
    if not experts:
        out.append("experts: no experts; list them as `- source_model: PATH` with `positive_prompts:`")
    if config.gate_mode not in GATE_MODES:
        out.append(f"gate_mode: {config.gate_mode!r} is not a gate mode{suggest(config.gate_mode, GATE_MODES)}; "
                   f"use one of {', '.join(GATE_MODES)}")
    if config.experts_per_token < 1:
        out.append(f"experts_per_token: {config.experts_per_token} must be at least 1")
    elif experts and config.experts_per_token > len(experts):
        out.append(f"experts_per_token: {config.experts_per_token} is more than the {len(experts)} experts listed")
    if config.dtype is not None:
        try:
            parse_dtype(config.dtype)
        except ValueError as exc:
            out.append(f"dtype: {exc}")
    groups = [("experts", experts), ("shared_experts", config.shared_experts or [])]
    for group, entries in groups:
        for i, e in enumerate(entries):
            out += _expert_problems(f"{group}[{i}]", e, config.gate_mode)
    if config.gate_mode in PROMPTED and len(experts) > 1 and all(e.positive_prompts for e in experts):
        first = _prompt_key(experts[0])
        if all(_prompt_key(e) == first for e in experts[1:]):
            out.append("experts: every expert has the same positive and negative prompts, so every gate is the "
                       "same; give each expert prompts that show what should be routed to it")
    sources = [e.source_model for e in experts]
    if len(sources) > 1 and len(set(sources)) == 1 and not allow_all_same:
        out.append(f"experts: every expert is {sources[0]!r}, which gives a bigger model with the same output; "
                   + ALL_SAME_FIX)
    return out


def _prompt_key(e: ExpertEntry) -> tuple:
    return tuple(e.positive_prompts or ()), tuple(e.negative_prompts or ())


def _expert_problems(where: str, e: ExpertEntry, gate_mode: str) -> list[str]:
    out = []
    if gate_mode in PROMPTED and not e.positive_prompts:
        out.append(f"{where}.positive_prompts is empty; gate_mode {gate_mode} makes each gate from its expert's "
                   "prompts: give one or more prompts showing what should be routed to it")
    for key in ("positive_prompts", "negative_prompts"):
        for j, p in enumerate(getattr(e, key) or []):
            if not p.strip():
                out.append(f"{where}.{key}[{j}] is an empty prompt; remove it or write the prompt")
    for key in ("noise_scale", "residual_scale"):
        value = getattr(e, key)
        if value is not None and not math.isfinite(value):
            out.append(f"{where}.{key}: {value} is not a finite number")
    if e.noise_scale is not None and e.noise_scale < 0:
        out.append(f"{where}.noise_scale: {e.noise_scale} is negative; it is a standard deviation")
    return out


def select_output(config: MoEConfig, problems: list[str]) -> str:
    """The output architecture: Mixtral, or Qwen MoE when shared experts are asked for (mergekit's choice)."""
    names = list(OUTPUTS)
    if config.architecture:
        names = [n for n in OUTPUTS if n.lower().startswith(config.architecture.lower())]
        if not names:
            problems.append(f"architecture: {config.architecture!r} names no output architecture; use mixtral "
                            "(Mixtral) or qwen (Qwen2-MoE, with one shared expert)")
            return "Mixtral"
    names = [n for n in names if OUTPUTS[n] is not None] or names
    shared = config.shared_experts or []
    if OUTPUTS[names[0]] is None:
        problems.append(f"architecture: mergekit's {names[0]} output is not implemented in mergelab; use mixtral "
                        "or qwen (Qwen2-MoE)")
    elif shared and len(shared) != 1:
        problems.append(f"shared_experts: {len(shared)} given; the Qwen2-MoE output has exactly one shared expert")
    elif shared and "Qwen MoE" not in names:
        problems.append("shared_experts: Mixtral has no shared expert; remove them, or set `architecture: qwen` "
                        "for a Qwen2-MoE output")
    elif not shared and "Mixtral" not in names:
        problems.append("shared_experts: the Qwen2-MoE output needs exactly one shared expert; add one "
                        "(`shared_experts: [{source_model: PATH, positive_prompts: [...]}]`)")
    return "Qwen MoE" if shared else "Mixtral"


def resolve(ref: str, folder: Path) -> Path:
    """A model path: as given if it exists from the current folder, else relative to the config's folder."""
    p = Path(ref).expanduser()
    if p.is_absolute() or p.exists() or not (folder / p).exists():
        return Path(os.path.abspath(p))
    return Path(os.path.abspath(folder / p))


# Keys every input must agree on, read from config.json: what the experts' MLPs depend on. (Not the
# vocabulary: only the base's embeddings are used, and mergekit-moe accepts experts with added tokens.)
_SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "intermediate_size")
MLP_NAMES = ("gate_proj", "up_proj", "down_proj")


def _open_config(where: str, path: Path, problems: list[str]) -> dict | None:
    if not path.exists():
        problems.append(f"{where}: {path} does not exist; relative paths resolve against the current folder, "
                        "then the config's folder (Hub ids are not downloaded: download the model, give its folder)")
        return None
    try:
        with Checkpoint(path) as ck:
            config = dict(ck.config or {})
            config["_tensors"] = {n: ck.shape(n) for n in ck}
            config["_dtype"] = next((ck.dtype(n) for n in ck if n.endswith("embed_tokens.weight")), None)
    except MergeError as exc:
        problems.append(f"{where}: {exc}")
        return None
    if "model_type" not in config:
        problems.append(f"{where}: {path} has no config.json with a model_type; give a Hugging Face model folder")
        return None
    return config


def _model_problems(config: MoEConfig, text: str, refs: list[tuple[str, Path]], output: str,
                    problems: list[str]) -> MoEPlan | None:
    configs = {where: _open_config(where, p, problems) for where, p in refs}
    if any(c is None for c in configs.values()):
        return None
    allowed = OUTPUTS[output]
    base = configs["base_model"]
    for where, c in configs.items():
        if c["model_type"] not in allowed:
            problems.append(f"{where}: model_type {c['model_type']!r} is not supported for a {output} output; "
                            f"inputs must be {' or '.join(allowed)} models")
        elif c["model_type"] != base["model_type"]:
            problems.append(f"{where}: model_type {c['model_type']!r} differs from the base's "
                            f"{base['model_type']!r}; every model must share one architecture")
        for key in ("attention_bias", "mlp_bias"):
            if c.get(key) and c["model_type"] != "qwen2":
                problems.append(f"{where}: config.json has {key}: true; the MoE outputs have no such biases, "
                                "so mergelab refuses rather than drop them")
        for key in _SHAPE_KEYS:
            if c.get(key) != base.get(key):
                problems.append(f"{where}: {key} is {c.get(key)} but the base model's is {base.get(key)}; "
                                "every model must have the same shapes")
    if problems:
        return None
    hidden, inter, layers = base["hidden_size"], base["intermediate_size"], base["num_hidden_layers"]
    want = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    for where, c in list(configs.items())[1:]:
        for layer in range(layers):
            for proj, shape in want.items():
                name = f"model.layers.{layer}.mlp.{proj}.weight"
                got = c["_tensors"].get(name)
                if got != shape:
                    problems.append(f"{where}: tensor {name} is {'missing' if got is None else got}, expected "
                                    f"{shape}; experts must be dense {base['model_type']} models of the base's shape")
                    break
            else:
                continue
            break
    dtype = parse_dtype(config.dtype) if config.dtype else _config_dtype(base)
    return MoEPlan(config=config, text=text, base=refs[0][1],
                   experts=[p for w, p in refs if w.startswith("experts")],
                   shared=[p for w, p in refs if w.startswith("shared_experts")], output=output,
                   base_config={k: v for k, v in base.items() if not k.startswith("_")}, dtype=dtype,
                   hidden_size=hidden, intermediate_size=inter, num_layers=layers)


def _config_dtype(config: dict) -> torch.dtype | None:
    """The base's dtype: config.json's dtype / torch_dtype, else its embedding's stored dtype."""
    for key in ("dtype", "torch_dtype"):
        try:
            if config.get(key):
                return parse_dtype(config[key])
        except ValueError:
            pass
    return config.get("_dtype")
