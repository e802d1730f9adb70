"""The metric each model's optimizer trained it in, read from a saved optimizer state.

An optimizer preconditions every gradient step; the diagonal of that
preconditioner is a metric on the weights (large where the optimizer moved
cautiously). From `optimizer.state_dict()`:

    Adam / AdamW   G = sqrt(v_hat) + eps,  v_hat = exp_avg_sq / (1 - beta2^step)
                   (max_exp_avg_sq instead of exp_avg_sq with amsgrad)
    SGD, momentum  G = 1
    Adagrad        G = sqrt(sum) + eps
    RMSprop        G = sqrt(square_avg) + eps   (square_avg - grad_avg^2 when centered)

which is exactly the denominator each optimizer divides its step by. A state
dict names parameters by integer index; `extract_optimizer_metrics` maps them
back to parameter names (see its docstring) and refuses to guess when the
mapping is ambiguous.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mergelab.errors import StatsError
from mergelab.stats.io import StatsDict

KINDS = ("adam", "sgd", "adagrad", "rmsprop")
_ALIASES = {"adamw": "adam", "momentum": "sgd"}
# The tensors of each kind's state that have the parameter's shape.
_STATE_TENSORS = ("exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "sum", "square_avg", "grad_avg")
# Parameter names the Hugging Face Trainer exempts from weight decay (its second param group).
_NO_DECAY = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")


def _canonical(kind: str) -> str:
    k = _ALIASES.get(kind.lower(), kind.lower())
    if k not in KINDS:
        raise StatsError(f"optimizer kind {kind!r} is not supported; use one of adam, adamw, sgd, adagrad, rmsprop")
    return k


def detect_kind(optimizer_state_dict: Mapping[str, Any]) -> str:
    """adam, sgd, adagrad or rmsprop, from the keys of the per-parameter state.

    exp_avg_sq -> adam (Adam and AdamW keep the same state); sum -> adagrad;
    square_avg -> rmsprop; momentum_buffer, or no state at all in groups that
    have a ``momentum`` setting -> sgd.
    """
    keys = set()
    for s in optimizer_state_dict.get("state", {}).values():
        keys |= {k for k, v in s.items() if v is not None}
    for key, kind in (("exp_avg_sq", "adam"), ("sum", "adagrad"), ("square_avg", "rmsprop"),
                      ("momentum_buffer", "sgd")):
        if key in keys:
            return kind
    groups = optimizer_state_dict.get("param_groups", [])
    if keys <= {"step"} and groups and all("momentum" in g for g in groups):
        return "sgd"
    raise StatsError(f"cannot tell the optimizer from its state keys {sorted(keys) or 'none'}; pass kind= "
                     "(adam, sgd, adagrad, rmsprop), or save the state after at least one step")


def _shape_of(state: Mapping[str, Any]) -> tuple[int, ...] | None:
    for key in _STATE_TENSORS:
        t = state.get(key)
        if isinstance(t, torch.Tensor):
            return tuple(t.shape)
    return None


def metric_from_state(kind: str, state: Mapping[str, Any], hyper: Mapping[str, Any], *,
                      shape: Sequence[int] | None = None) -> torch.Tensor:
    """The diagonal metric G of one parameter from its optimizer state (float32).

    Args:
        kind: adam (or adamw), sgd (or momentum), adagrad, rmsprop.
        state: that parameter's entry of ``optimizer.state_dict()["state"]``.
        hyper: its param group (betas, eps, amsgrad, centered, ...).
        shape: the parameter's shape, needed for SGD without momentum (it keeps no state).

    Raises:
        StatsError: the state lacks what the kind needs.
    """
    kind = _canonical(kind)
    if kind == "sgd":
        found = _shape_of(state) or (tuple(shape) if shape is not None else None)
        if found is None:
            raise StatsError("SGD keeps no state without momentum, so the parameter's shape must be given")
        return torch.ones(found, dtype=torch.float32)
    need = {"adam": "exp_avg_sq", "adagrad": "sum", "rmsprop": "square_avg"}[kind]
    if kind == "adam" and hyper.get("amsgrad") and state.get("max_exp_avg_sq") is not None:
        need = "max_exp_avg_sq"  # amsgrad divides by the running maximum instead
    v = state.get(need)
    if not isinstance(v, torch.Tensor):
        raise StatsError(f"{kind} state has no {need!r} (keys: {sorted(state)}); is it really {kind}?")
    v = v.to(torch.float64)
    eps = float(hyper.get("eps", 1e-10 if kind == "adagrad" else 1e-8))
    if kind == "adam":
        step = float(state.get("step", 0))
        if step <= 0:
            raise StatsError("adam state has step 0, so its second moment is not yet an estimate")
        beta2 = float(hyper.get("betas", (0.9, 0.999))[1])
        return ((v / (1 - beta2**step)).sqrt() + eps).float()
    if kind == "rmsprop" and hyper.get("centered") and isinstance(state.get("grad_avg"), torch.Tensor):
        mean = state["grad_avg"].to(torch.float64)
        v = (v - mean * mean).clamp_min(0)  # the variance, not the raw second moment
    return (v.sqrt() + eps).float()


@dataclasses.dataclass
class _Params:
    """Parameter names in order, with shapes when known, and the Trainer's no-decay names."""

    orders: list[list[str]]  # candidate name orders (all parameters; only trainable ones)
    shapes: dict[str, tuple[int, ...]] | None
    no_decay: set[str]
    aliases: dict[str, list[str]]  # name -> other names of the same (tied) tensor


def _params_of(model_or_param_names: Any) -> _Params:
    obj = model_or_param_names
    if isinstance(obj, torch.nn.Module):
        named = list(obj.named_parameters())
        owners = {f"{m}.{n}" if m else n for m, mod in obj.named_modules() if isinstance(mod, torch.nn.LayerNorm)
                  for n, _ in mod.named_parameters(recurse=False)}
        names = [n for n, _ in named]
        trainable = [n for n, p in named if p.requires_grad]
        by_id: dict[int, list[str]] = {}
        for n, p in obj.named_parameters(remove_duplicate=False):
            by_id.setdefault(id(p), []).append(n)
        aliases = {ns[0]: ns[1:] for ns in by_id.values() if len(ns) > 1}
        return _Params([names] + ([trainable] if trainable != names else []),
                       {n: tuple(p.shape) for n, p in named},
                       {n for n in names if _NO_DECAY.search(n.lower()) or n in owners}, aliases)
    if isinstance(obj, Mapping):
        names = list(obj)
        shape = getattr(obj, "shape", None)
        shapes = {n: tuple(shape(n)) if callable(shape) else tuple(getattr(obj[n], "shape", obj[n])) for n in names}
        return _Params([names], shapes, {n for n in names if _NO_DECAY.search(n.lower())}, {})
    if isinstance(obj, Sequence) and not isinstance(obj, str):
        names = [str(n) for n in obj]
        return _Params([names], None, {n for n in names if _NO_DECAY.search(n.lower())}, {})
    raise StatsError(f"expected an nn.Module, a mapping name -> shape, or a list of parameter names, "
                     f"got {type(obj).__name__}")


def _fits(pairs: list[tuple[int, str]], state: Mapping[int, Any], shapes: dict | None) -> str | None:
    """None if every state tensor has its parameter's shape, else the first mismatch."""
    if shapes is None:
        return None
    for idx, name in pairs:
        got = _shape_of(state.get(idx, {}))
        if got is not None and got != shapes[name]:
            return f"state {idx} has shape {got} but parameter {name!r} has {shapes[name]}"
    return None


def _candidates(params: _Params, groups: list[dict]) -> dict[str, list[tuple[int, str]]]:
    flat = [i for g in groups for i in g["params"]]
    out = {}
    for names in params.orders:
        if len(names) != len(flat):
            continue
        out[f"named_parameters order ({len(names)} parameters)"] = list(zip(flat, names))
        if len(groups) == 2:
            decay = [n for n in names if n not in params.no_decay]
            rest = [n for n in names if n in params.no_decay]
            if (len(groups[0]["params"]), len(groups[1]["params"])) == (len(decay), len(rest)):
                out["Hugging Face Trainer's weight-decay / no-decay groups"] = list(zip(flat, decay + rest))
    return out


def map_indices(params: _Params, osd: Mapping[str, Any], source: str) -> dict[int, str]:
    """state index -> parameter name; StatsError unless exactly one mapping fits."""
    groups, state = osd.get("param_groups"), osd.get("state")
    if not isinstance(groups, list) or not isinstance(state, Mapping):
        raise StatsError(f"{source} is not an optimizer.state_dict() (needs 'state' and 'param_groups')")
    known = set(params.orders[0])
    if groups and all("param_names" in g for g in groups):
        # Optimizers built from named_parameters() (torch >= 2.5) store the names: no guessing.
        pairs = [(i, n) for g in groups for i, n in zip(g["params"], g["param_names"])]
        unknown = [n for _, n in pairs if n not in known]
        if unknown:
            raise StatsError(f"{source} names parameters the model lacks, e.g. {unknown[:3]}; wrong model?")
        problem = _fits(pairs, state, params.shapes)
        if problem:
            raise StatsError(f"{source} does not fit the model: {problem}")
        return dict(pairs)
    flat = sum(len(g["params"]) for g in groups)
    cands = _candidates(params, groups)
    if not cands:
        counts = " or ".join(str(len(o)) for o in params.orders)
        raise StatsError(f"{source} holds {flat} parameters but the model has {counts}, so its indices cannot "
                         "be matched to names; pass the model the optimizer was built for")
    fitting = {label: pairs for label, pairs in cands.items() if _fits(pairs, state, params.shapes) is None}
    distinct = {tuple(pairs): label for label, pairs in fitting.items()}
    if not distinct:
        label, pairs = next(iter(cands.items()))
        raise StatsError(f"{source} does not fit the model in {label}: {_fits(pairs, state, params.shapes)}")
    if len(distinct) > 1:
        raise StatsError(f"{source}: the parameter order is ambiguous ({' and '.join(distinct.values())} both "
                         "fit); pass an nn.Module with shapes, or build the optimizer from "
                         "model.named_parameters() so its state records the names")
    return dict(next(iter(distinct)))


def extract_optimizer_metrics(model_or_param_names: Any, optimizer_state_dict: Mapping[str, Any], *,
                              kind: str | None = None, divide_by_lr: bool = False,
                              source: str = "optimizer state") -> StatsDict:
    """Diagonal metric of every parameter, keyed by parameter name, from a saved optimizer state.

    State indices are matched to names by the PyTorch convention: the indices of
    the param groups, in order, are the parameters in model.named_parameters()
    order. Two layouts are tried: that order as is (an optimizer built from
    model.parameters(), trainable ones only if the counts say so) and the
    Hugging Face Trainer's two groups (weight-decayed parameters, then biases and
    norms). Every state tensor must have its parameter's shape; if no layout fits,
    or two different ones do, StatsError says so rather than guessing. States
    that record ``param_names`` (optimizers built from named_parameters()) are
    used directly.

    Args:
        model_or_param_names: the model (nn.Module, best: shapes and tied names),
            a mapping name -> shape/tensor of its parameters in named_parameters()
            order, or just the names in that order.
        optimizer_state_dict: ``optimizer.state_dict()``, e.g. from torch.load(weights_only=True).
        kind: adam, adamw, sgd, adagrad or rmsprop; detected from the state when None.
        divide_by_lr: divide each metric by its group's learning rate (``initial_lr``
            if a scheduler set it, else ``lr``): G becomes the inverse of each weight's
            step size, a unit shared by models trained with different optimizers.
        source: how to name the state in messages (its file).

    Returns:
        StatsDict name -> float32 metric (kind "optimizer"; extra holds the optimizer kind).

    Raises:
        StatsError: unknown optimizer, ambiguous or mismatched mapping, parameters without state.
    """
    params = _params_of(model_or_param_names)
    kind = _canonical(kind) if kind else detect_kind(optimizer_state_dict)
    mapping = map_indices(params, optimizer_state_dict, source)
    state = optimizer_state_dict["state"]
    hyper_of = {i: g for g in optimizer_state_dict["param_groups"] for i in g["params"]}
    missing = [n for i, n in mapping.items() if kind != "sgd" and not state.get(i)]
    if missing:
        raise StatsError(f"{source}: {len(missing)} parameters have no {kind} state, e.g. {missing[:3]}; the "
                         "optimizer never updated them (frozen or unused); save the state after training them")
    out = StatsDict(kind="optimizer", extra={"optimizer": kind, "divide_by_lr": divide_by_lr})
    for idx, name in mapping.items():
        shape = params.shapes.get(name) if params.shapes else None
        g = metric_from_state(kind, state.get(idx, {}), hyper_of[idx], shape=shape)
        if divide_by_lr:
            lr = float(hyper_of[idx].get("initial_lr", hyper_of[idx].get("lr", 0.0)))
            if lr <= 0:
                raise StatsError(f"{source}: parameter {name!r} has learning rate {lr}; cannot divide by it")
            g = g / lr
        out[name] = g
        for alias in params.aliases.get(name, []):
            out[alias] = g
    return out


@dataclasses.dataclass
class TrainerCheckpoint:
    """A Hugging Face Trainer ``checkpoint-N/`` folder: weights, optimizer state, model skeleton.

    Attributes:
        folder: the folder.
        weights: its model weights (lazy Checkpoint).
        optimizer_state: ``optimizer.pt`` loaded with weights_only=True.
        model: the architecture of config.json built on the meta device (no memory,
            no weights), for parameter order and shapes; None if it could not be built.
    """

    folder: Path
    weights: Any
    optimizer_state: dict
    model: torch.nn.Module | None

    def optimizer_metrics(self, *, kind: str | None = None, divide_by_lr: bool = False) -> StatsDict:
        """`extract_optimizer_metrics` with this folder's model and optimizer state."""
        if self.model is None:
            raise StatsError(f"{self.folder}: could not build the model from config.json to learn its parameter "
                             "order; call extract_optimizer_metrics(model, ckpt.optimizer_state) with the model")
        return extract_optimizer_metrics(self.model, self.optimizer_state, kind=kind, divide_by_lr=divide_by_lr,
                                         source=str(self.folder / "optimizer.pt"))


def _skeleton(folder: Path) -> torch.nn.Module | None:
    """The model class named in config.json's ``architectures``, built on the meta device."""
    try:
        import transformers

        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        cls = getattr(transformers, (config.architectures or [""])[0], None)
        if cls is None:
            return None
        with torch.device("meta"):
            return cls(config)
    except Exception:  # noqa: BLE001 - any failure just means "no skeleton": the caller explains what to do
        return None


def load_trainer_checkpoint(folder: str | Path) -> TrainerCheckpoint:
    """Open a Trainer checkpoint folder (model weights + optimizer.pt) for optimizer-metric extraction.

    Raises:
        StatsError: no optimizer.pt, or it cannot be read safely.
    """
    from mergelab.checkpoint.reader import Checkpoint
    from mergelab.checkpoint.state_file import load_state

    folder = Path(folder)
    opt = folder / "optimizer.pt"
    if not opt.is_file():
        raise StatsError(f"{folder} has no optimizer.pt; the Trainer saves it unless save_only_model=True, "
                         "so the optimizer state of this run is lost")
    try:
        state = load_state(opt)
    except Exception as exc:  # noqa: BLE001 - unpickling errors come in many types
        raise StatsError(f"{opt} cannot be loaded with weights_only=True ({exc}); "
                         "it is damaged or holds more than an optimizer state") from None
    return TrainerCheckpoint(folder, Checkpoint(folder), state, _skeleton(folder))
