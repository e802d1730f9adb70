"""Effective noise scale of a training configuration.

Zhang, Theus, Teney, Orvieto, Pang and Mauw (2025), "How does the optimizer
implicitly bias the model merging loss landscape?", arXiv:2510.04686, find that
how well independently trained models merge is a non-monotonic function of one
quantity, the effective noise scale of the optimizer that trained them:

    S = lr / (B (1 - m)^k) * v_aug

Why this form (the SGD-as-SDE view; Mandt, Hoffman and Blei, 2017, arXiv:1704.04289;
Smith and Le, 2018, arXiv:1710.06451). A minibatch gradient is the full gradient
plus noise of covariance Sigma / B. Plain SGD, theta <- theta - lr g, then moves like
the Langevin SDE d theta = -grad L dt + sqrt(lr / B) Sigma^(1/2) dW in the time
t = lr * steps: the ratio of diffusion to drift, the "temperature" that sets how
widely the iterates spread around a minimum, is lr / B. Heavy-ball momentum m
averages past gradients; over times longer than 1 / (1 - m) steps both the drift and
the noise are amplified by 1 / (1 - m), so the per-step drift is lr / (1 - m) grad L
and the per-step diffusion (lr / (1 - m))^2 Sigma / B. Their ratio gives
temperature lr / (B (1 - m)): k = 1, which is the default here.

k = 2 is the per-step diffusion measured against the raw learning rate,
(lr / (1 - m))^2 / (B lr) = lr / (B (1 - m)^2). It is what one gets by substituting the
effective learning rate lr / (1 - m) into a formula that already accounts for
momentum, counting it twice; it grows faster with m and is offered to reproduce
work that uses it, not as the recommended measure.

v_aug scales the gradient-noise variance for data augmentation: the ratio of the
per-example gradient variance with augmentation to that without (1 when unknown
or unused), since augmentation adds sampling noise on top of minibatch noise.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any


from mergelab.errors import MergeError


def effective_noise_scale(lr: float, batch_size: float, momentum: float = 0.0, *, k: float = 1,
                          augmentation_variance: float = 1.0) -> float:
    """S = lr / (batch_size (1 - momentum)^k) * augmentation_variance (see the module docstring).

    Args:
        lr: peak learning rate.
        batch_size: examples per optimizer step, over all devices and accumulation steps.
        momentum: heavy-ball momentum in [0, 1) (Adam's beta1 as the analogue).
        k: power of 1 / (1 - momentum): 1 is the SDE temperature, 2 counts momentum twice.
        augmentation_variance: factor (> 0) on the gradient-noise variance from data augmentation.
    """
    checks = [(math.isfinite(lr) and lr > 0, f"lr must be a positive number, got {lr}"),
              (math.isfinite(batch_size) and batch_size >= 1, f"batch_size must be >= 1, got {batch_size}"),
              (0 <= momentum < 1, f"momentum must be in [0, 1), got {momentum}"),
              (math.isfinite(k) and k >= 0, f"k must be >= 0, got {k}"),
              (math.isfinite(augmentation_variance) and augmentation_variance > 0,
               f"augmentation_variance must be positive, got {augmentation_variance}")]
    problems = [msg for ok, msg in checks if not ok]
    if problems:
        raise MergeError("effective_noise_scale: " + "; ".join(problems))
    return lr / (batch_size * (1 - momentum) ** k) * augmentation_variance


@dataclasses.dataclass
class NoiseScale:
    """An effective noise scale and where each of its inputs came from; plain data."""

    noise_scale: float
    lr: float
    batch_size: int
    momentum: float
    k: float
    augmentation_variance: float
    notes: list[str]  # assumptions made while reading the configuration

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_ADAM_LIKE = ("adam", "lion", "lamb", "ademamix")  # optimizers whose beta1 plays momentum's part
_NO_MOMENTUM = ("adafactor", "adagrad", "rmsprop")  # no first-moment buffer in their HF default setup


def _read_source(source: str | Path | Mapping[str, Any] | Any) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(training arguments, trainer state, label) from a folder, a JSON file, a dict or a TrainingArguments."""
    if hasattr(source, "to_dict") and not isinstance(source, Mapping):
        return dict(source.to_dict()), {}, "TrainingArguments"
    if isinstance(source, Mapping):
        return dict(source), {}, "the given dict"
    path = Path(source)
    files = [path / "training_args.json", path / "trainer_state.json"] if path.is_dir() else [path]
    found = {}
    from mergelab.jsonfile import read_json_file

    for f in files:
        if f.is_file():
            data = read_json_file(f, "training arguments or trainer state", error=MergeError)
            if not isinstance(data, dict):
                raise MergeError(f"{f}: is a JSON {type(data).__name__}, not the object a Trainer writes "
                                 "(training_args.json or trainer_state.json); check the file")
            if not isinstance(data.get("log_history", []), list):
                raise MergeError(f"{f}: log_history is not a list; check the file")
            found[f.name] = data
    if not found:
        raise MergeError(f"{path}: no training_args.json or trainer_state.json there; save the arguments with "
                         "`json.dump(args.to_dict(), ...)`, or pass lr, batch size and momentum directly")
    state = found.pop("trainer_state.json", {})
    args = next(iter(found.values()), {})
    if "log_history" in args and not state:  # a lone file given by path may be a trainer state
        args, state = {}, args
    return args, state, str(path)


def _momentum(args: Mapping[str, Any], notes: list[str], label: str) -> float:
    if "optim" not in args:
        notes.append("optimizer not recorded; the Trainer's default adamw_torch assumed")
    optim = str(args.get("optim", "adamw_torch")).lower()
    extra = dict(kv.split("=", 1) for kv in str(args.get("optim_args") or "").replace(" ", "").split(",") if "=" in kv)
    if "sgd" in optim:
        notes.append(f"optimizer {optim}: momentum from optim_args (0 unless set there)")
        return float(extra.get("momentum", 0.0))
    if any(name in optim for name in _ADAM_LIKE):
        notes.append(f"optimizer {optim}: adam_beta1 taken as the momentum analogue (Adam's first-moment "
                     "average plays heavy-ball momentum's part in the SDE view; an assumption, not exact)")
        return float(extra.get("beta1", args.get("adam_beta1", 0.9)))
    if any(name in optim for name in _NO_MOMENTUM):
        notes.append(f"optimizer {optim}: no momentum buffer in its default setup, momentum 0")
        return 0.0
    raise MergeError(f"{label}: optimizer {optim!r} has no known momentum analogue; pass momentum= explicitly")


def noise_scale_from_trainer(folder_or_args: str | Path | Mapping[str, Any] | Any, *, world_size: int | None = None,
                             momentum: float | None = None, k: float = 1,
                             augmentation_variance: float = 1.0) -> NoiseScale:
    """Effective noise scale of a Hugging Face Trainer run.

    Reads learning_rate, per_device_train_batch_size, gradient_accumulation_steps and the
    optimizer from training arguments (a dict, a TrainingArguments, a training_args.json,
    or a folder holding it); trainer_state.json fills in what is missing (the largest
    logged learning rate, its train_batch_size). Batch size = per-device size x
    accumulation steps x world size.

    Args:
        folder_or_args: a run or checkpoint folder, a JSON file, a dict or a TrainingArguments.
        world_size: number of data-parallel processes; default: the config's "world_size"
            if present, else 1 (recorded in notes, since HF does not save it).
        momentum: override the momentum read from the optimizer settings.
        k, augmentation_variance: as in `effective_noise_scale`.
    """
    args, state, label = _read_source(folder_or_args)
    notes: list[str] = []
    lr = args.get("learning_rate")
    if lr is None:
        logged = [e["learning_rate"] for e in state.get("log_history", [])
                  if isinstance(e, dict) and isinstance(e.get("learning_rate"), (int, float))]
        if not logged:
            raise MergeError(f"{label}: no learning_rate in the training arguments or the logged history; "
                             "pass the training arguments (training_args.json)")
        lr = max(logged)
        notes.append("learning rate: the largest logged in trainer_state.json (the peak of the schedule)")
    per_device = args.get("per_device_train_batch_size", state.get("train_batch_size"))
    if per_device is None:
        raise MergeError(f"{label}: no per_device_train_batch_size or train_batch_size; pass the training arguments")
    accumulation = int(args.get("gradient_accumulation_steps", 1))
    if world_size is None:
        world_size = int(args.get("world_size", 1))
        if "world_size" not in args:
            notes.append("world size not recorded in the configuration; 1 assumed (pass world_size=)")
    if momentum is None:
        momentum = _momentum(args, notes, label)
    batch = int(per_device) * accumulation * int(world_size)
    s = effective_noise_scale(float(lr), batch, momentum, k=k, augmentation_variance=augmentation_variance)
    return NoiseScale(noise_scale=s, lr=float(lr), batch_size=batch, momentum=float(momentum), k=k,
                      augmentation_variance=augmentation_variance, notes=notes)
