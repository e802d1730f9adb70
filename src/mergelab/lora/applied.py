"""A model with a LoRA adapter applied on the fly: MergeKit's `model+lora` input.

`AppliedLoraCheckpoint(model, adapter)` reads like the model's Checkpoint, except
that each adapted weight is returned as W + s B A (float32), computed when the
tensor (or a block of its rows) is read. Nothing else is read or copied; the
adapter's factors stay in memory (they are small).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mergelab.checkpoint.reader import Checkpoint
from mergelab.errors import CheckpointError
from mergelab.lora.peft_format import LoraLayer, is_peft_adapter, read_adapter

if TYPE_CHECKING:
    from mergelab.recipe.resolve import ModelInput

__all__ = ["AppliedLoraCheckpoint", "open_input"]


class AppliedLoraCheckpoint(Checkpoint):
    """Read-only mapping name -> tensor of `model` with `adapter`'s updates added.

    Adapted tensors keep the model's dtype in the metadata (dtype(), nbytes()), but
    are read as float32 so that W + delta is rounded once, by the merge's output.
    """

    def __init__(self, model: str | os.PathLike, adapter: str | os.PathLike):
        if is_peft_adapter(model):
            raise CheckpointError(f"{model} is a LoRA adapter, not a model; an adapter applies to the full "
                                  f"model it was trained on (as base_model, or `model+{adapter}`)")
        super().__init__(model)
        self.adapter_path = Path(adapter)
        shapes = {name: self.shape(name) for name in self}
        info = read_adapter(adapter, shapes)
        self.layers: dict[str, LoraLayer] = {layer.weight_name: layer for layer in info.layers.values()}

    def __repr__(self) -> str:
        return f"AppliedLoraCheckpoint({str(self.path)!r}+{str(self.adapter_path)!r})"

    def _applied(self, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        layer = self.layers[name]
        w = super().view(name, rows)
        if rows is None:
            return w.to(torch.float32) + layer.delta()
        return w.to(torch.float32) + layer.delta_rows(*rows)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.layers:
            return self._applied(name, None)
        return super().__getitem__(name)

    def view(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        if name in self.layers:
            return self._applied(name, rows)
        return super().view(name, rows)


def open_input(inp: ModelInput) -> Checkpoint:
    """Open one input of a recipe as `mergelab.recipe.resolve` describes it: a plain checkpoint,
    `model+adapter`, or an adapter folder applied to the base model."""
    if inp.adapter is None:
        return Checkpoint(inp.model)
    if inp.model is None:
        raise CheckpointError(f"{inp.path} is a LoRA adapter; merging adapters into a model needs `base_model:` "
                              "(the model they were trained on), or add `adapter: {rank: R}` to write "
                              "a merged adapter instead")
    return AppliedLoraCheckpoint(inp.model, inp.adapter)
