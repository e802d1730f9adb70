"""Weights of checkpoint-averaging schemes along one training run.

Every scheme turns the steps of K saved checkpoints (oldest first) into K
non-negative weights summing to one; the average is sum_k c_k theta_k.

- sma: simple moving average over the last `last` checkpoints, c_k = 1/K
  (Polyak averaging over a window; LAWA, Kaddour 2022, arXiv:2209.14981,
  is the same over the latest checkpoints of a run).
- wma: weighted moving average, c_k proportional to k (1, 2, ..., K): newer
  checkpoints count more.
- ema: exponential moving average with decay `alpha` applied checkpoint by
  checkpoint, theta_ema <- alpha * theta_ema + (1 - alpha) * theta_k, starting
  from theta_1; unrolled, c_1 = alpha^(K-1), c_k = (1 - alpha) alpha^(K-k).
- lawa: sma over the last `last` checkpoints (kept as its own name because
  that is what users look for).
- wsm: Warmup-Stable-Merge (Tian et al. 2025, arXiv:2507.17634). Merging
  checkpoints with weights c is equivalent to decaying the learning rate with
  w_i = sum_{j >= i} c_j; so a decay shape w (w_1 = 1 >= w_2 >= ... >= w_K >= 0,
  sampled at the checkpoints) gives c_K = w_K, c_j = w_j - w_{j+1}, then
  normalised. A linear decay to zero gives uniform weights; 1-sqrt and cosine
  give their own shapes.
"""

from __future__ import annotations

from mergelab.errors import InvalidInput

import math
from collections.abc import Sequence

SCHEMES = ("sma", "wma", "ema", "lawa", "wsm")
DECAYS = ("linear", "cosine", "1-sqrt")


def decay_shape(k: int, decay: str) -> list[float]:
    """The learning-rate multiplier w_1..w_k of a decay phase sampled at k checkpoints.

    w_i = f((i - 1) / k) for i = 1..k with f(0) = 1 and f(1) = 0 (the step after
    the last checkpoint), so every checkpoint gets a positive weight.
    """
    if decay not in DECAYS:
        raise InvalidInput(f"unknown decay {decay!r}; choose one of {', '.join(DECAYS)}")
    out = []
    for i in range(k):
        x = i / k
        if decay == "linear":
            w = 1 - x
        elif decay == "cosine":
            w = 0.5 * (1 + math.cos(math.pi * x))
        else:
            w = 1 - math.sqrt(x)
        out.append(w)
    return out


def wsm_weights(shape: Sequence[float]) -> list[float]:
    """Merge weights c from a decay shape w: c_K = w_K, c_j = w_j - w_{j+1}, normalised to sum 1."""
    k = len(shape)
    c = [shape[j] - shape[j + 1] for j in range(k - 1)] + [shape[-1]]
    if any(v < -1e-12 for v in c):
        raise InvalidInput("a decay shape must not increase")
    total = sum(c)
    return [v / total for v in c]


def scheme_weights(scheme: str, count: int, *, alpha: float = 0.9, decay: str = "linear") -> list[float]:
    """Weights for `count` checkpoints (oldest first) under `scheme`."""
    if count < 1:
        raise InvalidInput("no checkpoints to average")
    if scheme in ("sma", "lawa"):
        return [1.0 / count] * count
    if scheme == "wma":
        total = count * (count + 1) / 2
        return [(k + 1) / total for k in range(count)]
    if scheme == "ema":
        if not 0.0 <= alpha < 1.0:
            raise InvalidInput(f"ema alpha must be in [0, 1), got {alpha}")
        w = [(1 - alpha) * alpha ** (count - 1 - k) for k in range(count)]
        w[0] = alpha ** (count - 1)
        return w
    if scheme == "wsm":
        return wsm_weights(decay_shape(count, decay))
    raise InvalidInput(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
