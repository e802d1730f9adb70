"""DiLoCo's settings as one validated value, separate from the objects it drives (model, optimizers, group).

    config = DiLoCoConfig(sync_every=500, outer_merge="ties", merge_params={"density": 0.3})
    DiLoCo(model, inner, outer, config=config)      # or DiLoCo(model, inner, outer, 500, outer_merge=...)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from mergelab.distributed.buckets import QUANTIZERS


@dataclass(frozen=True)
class DiLoCoConfig:
    """When and how workers sync (see diloco.py for the algorithm).

    sync_every: H, inner steps between syncs of a fragment (>= 1, a multiple of the fragments).
    outer_merge, merge_params: "mean" or a mergelab method name and its parameters.
    fragment_sync_delay: tau, inner steps a fragment's reduction overlaps before it is applied.
    fragment_update_alpha: weight of the worker's local parameters when a fragment is applied.
    quantize: "none", "bf16", "fp8" or "int4": the pseudo-gradients' wire format.
    backup_device: where the global parameters are kept (None: beside each parameter).
    bucket_cap_mb: size of the flat buffers the pseudo-gradients travel in.
    seed: seed of randomised merge methods (combined with the sync and tensor name).
    checkpoint_dir, checkpoint_every: rank 0 saves checkpoint-<sync>/ every K syncs.
    """

    sync_every: int
    outer_merge: str = "mean"
    merge_params: Mapping[str, Any] = field(default_factory=dict)
    fragment_sync_delay: int = 0
    fragment_update_alpha: float = 0.0
    quantize: str = "none"
    backup_device: str | torch.device | None = None
    bucket_cap_mb: float = 25
    seed: int = 0
    checkpoint_dir: str | Path | None = None
    checkpoint_every: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "merge_params", dict(self.merge_params or {}))
        h = self.sync_every
        if isinstance(h, bool) or not isinstance(h, int) or h < 1:
            raise ValueError(f"sync_every must be an integer >= 1, got {h!r}")
        if not 0.0 <= self.fragment_update_alpha <= 1.0:
            raise ValueError(f"fragment_update_alpha must be in [0, 1], got {self.fragment_update_alpha!r}")
        if self.quantize not in QUANTIZERS:
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZERS)}, got {self.quantize!r}")
        if not self.bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb must be > 0, got {self.bucket_cap_mb!r}")
        every = self.checkpoint_every
        if every is not None and (not isinstance(every, int) or every < 1):
            raise ValueError(f"checkpoint_every must be an integer >= 1, got {every!r}")

    def steps_per_fragment(self, fragments: int) -> int:
        """H / F: inner steps between two fragment syncs; checks the schedule fits `fragments`."""
        h, delay = self.sync_every, self.fragment_sync_delay
        if h % fragments or h < fragments:
            raise ValueError(f"sync_every ({h}) must be a multiple of the number of fragments ({fragments})")
        if not isinstance(delay, int) or not 0 <= delay < h // fragments:
            raise ValueError(f"fragment_sync_delay must be an integer in [0, sync_every / fragments = "
                             f"{h // fragments}), got {delay!r}")
        return h // fragments

    @classmethod
    def of(cls, config: DiLoCoConfig | None, sync_every: int | None, options: Mapping[str, Any]) -> DiLoCoConfig:
        """The config a constructor was given: `config`, or one built from sync_every and keyword options."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"unknown DiLoCo option {unknown[0]!r}; the options are {', '.join(sorted(names))}")
        if config is not None:
            if sync_every is not None or options:
                raise TypeError("pass either config= or sync_every and keyword options, not both")
            return config
        if sync_every is None:
            raise TypeError("DiLoCo needs sync_every (or config=DiLoCoConfig(...))")
        return cls(sync_every=sync_every, **options)
