"""Which device a run computes on: checked before any work is done."""

from __future__ import annotations

import torch

from mergelab.errors import InvalidInput, MergeError


def resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InvalidInput(f"device {device!r} is not a device torch knows; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda", "mps", "xpu"):
        raise InvalidInput(f"device {device!r}: mergelab merges on cpu or cuda (cuda:N); use one of those")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MergeError("device cuda was asked for but torch sees no CUDA GPU; merge on the cpu (device=\"cpu\")")
    return dev
