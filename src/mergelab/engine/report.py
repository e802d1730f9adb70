"""What a run of the engine reports."""

from __future__ import annotations

import dataclasses
from pathlib import Path


@dataclasses.dataclass
class RunReport:
    out_dir: Path | None  # None when the sink is not a folder (memory, observe-only)
    tensors: int
    merged: int
    copied: list[tuple[str, str]]  # (tensor, how it was handled specially)
    left_out: list[tuple[str, str, str]]
    bytes_read: int
    bytes_written: int
    seconds: float
    device: str
    nonfinite: list[str] = dataclasses.field(default_factory=list)  # "tensor (model path)" with NaN/Inf inputs
