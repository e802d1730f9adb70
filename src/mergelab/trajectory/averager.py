"""Averaging weights while training: EMA, SWA and LAWA in plain PyTorch.

    avg = WeightAverager(model, scheme="ema", decay=0.999, warmup=True)
    for step in ...:
        optimizer.step()
        avg.update(model)
    avg.copy_to(eval_model)

- ema: avg <- d * avg + (1 - d) * theta. With warmup the decay ramps as
  d_t = min(decay, (1 + t) / (10 + t)) (the schedule of TensorFlow's
  ExponentialMovingAverage with num_updates), so early averages are not
  dominated by the random initialisation.
- swa: running mean of every update, avg <- avg + (theta - avg) / (n + 1)
  (Izmailov et al. 2018, arXiv:1803.05407); matches
  torch.optim.swa_utils.AveragedModel's default.
- lawa: mean of the last `window` snapshots (Kaddour 2022, arXiv:2209.14981),
  kept in a ring buffer on CPU.

Buffers (batch-norm running statistics, counters) are copied from the latest
model, not averaged; after copying an average into a model with batch norm,
call `refresh_batchnorm` to recompute its statistics.
"""

from __future__ import annotations

from mergelab.errors import InvalidInput

from collections import deque
from collections.abc import Iterable

import torch
from torch import nn


class WeightAverager:
    """Keeps an average of a model's parameters along training (float32, on `device`)."""

    def __init__(self, model: nn.Module, scheme: str = "ema", *, decay: float = 0.999,
                 warmup: bool = False, window: int = 5, device: str | torch.device = "cpu"):
        if scheme not in ("ema", "swa", "lawa"):
            raise InvalidInput(f"unknown scheme {scheme!r}; choose ema, swa or lawa")
        if scheme == "ema" and not 0.0 <= decay < 1.0:
            raise InvalidInput(f"ema decay must be in [0, 1), got {decay}")
        if scheme == "lawa" and window < 1:
            raise InvalidInput(f"lawa window must be at least 1, got {window}")
        self.scheme, self.decay, self.warmup, self.window = scheme, decay, warmup, window
        self.device = torch.device(device)
        self.names = [n for n, p in model.named_parameters()]
        self.average: list[torch.Tensor] | None = None
        self.snapshots: deque[list[torch.Tensor]] = deque(maxlen=window)
        self.num_updates = 0

    def _params(self, model: nn.Module) -> list[torch.Tensor]:
        params = dict(model.named_parameters())
        missing = [n for n in self.names if n not in params]
        if missing:
            raise InvalidInput(f"model has no parameter {missing[0]!r}; WeightAverager was built for another model")
        return [params[n].detach() for n in self.names]

    def current_decay(self) -> float:
        if self.warmup:
            return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current parameters into the average."""
        params = [p.to(self.device, torch.float32) for p in self._params(model)]
        if self.scheme == "lawa":
            self.snapshots.append([p.clone() for p in params])
            self.average = None
        elif self.average is None:
            self.average = [p.clone() for p in params]
        elif self.scheme == "ema":
            d = self.current_decay()
            torch._foreach_lerp_(self.average, params, 1.0 - d)
        else:  # swa running mean
            torch._foreach_lerp_(self.average, params, 1.0 / (self.num_updates + 1))
        self.num_updates += 1

    def averaged(self) -> list[torch.Tensor]:
        if self.scheme == "lawa":
            if not self.snapshots:
                raise RuntimeError("no snapshot yet: call update(model) first")
            out = [torch.zeros_like(t) for t in self.snapshots[0]]
            for snap in self.snapshots:
                torch._foreach_add_(out, snap)
            torch._foreach_div_(out, float(len(self.snapshots)))
            return out
        if self.average is None:
            raise RuntimeError("no update yet: call update(model) first")
        return self.average

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the average into `model`'s parameters (in their dtype and device)."""
        for p, a in zip(self._params(model), self.averaged()):
            p.copy_(a.to(p.device, p.dtype))

    def state_dict(self) -> dict:
        return {
            "scheme": self.scheme, "decay": self.decay, "warmup": self.warmup, "window": self.window,
            "names": list(self.names), "num_updates": self.num_updates,
            "average": None if self.average is None else [t.clone() for t in self.average],
            "snapshots": [[t.clone() for t in s] for s in self.snapshots],
        }

    def load_state_dict(self, state: dict) -> None:
        if state["names"] != self.names or state["scheme"] != self.scheme:
            raise InvalidInput("averager state was saved for another model or scheme")
        self.decay, self.warmup, self.window = state["decay"], state["warmup"], state["window"]
        self.num_updates = state["num_updates"]
        self.average = None if state["average"] is None else [t.to(self.device) for t in state["average"]]
        self.snapshots = deque(([t.to(self.device) for t in s] for s in state["snapshots"]), maxlen=self.window)


@torch.no_grad()
def refresh_batchnorm(model: nn.Module, batches: Iterable, device: str | torch.device = "cpu") -> None:
    """Recompute batch-norm running statistics with one pass over `batches` (inputs or (inputs, ...) tuples)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = {m: m.momentum for m in norms}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the pass
    was_training = model.training
    model.train()
    for batch in batches:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        model(x.to(device))
    for m, mom in momenta.items():
        m.momentum = mom
    model.train(was_training)
