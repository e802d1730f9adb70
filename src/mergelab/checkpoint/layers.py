"""Transformer block indices in tensor names: model.layers.12.mlp.up_proj.weight -> 12."""

from __future__ import annotations

__all__ = ["layer_index", "with_layer_index"]

_LAYER_WORDS = frozenset({"layers", "h", "blocks", "block", "layer"})


def _layer_position(parts: list[str]) -> int | None:
    for i in range(len(parts) - 1):
        if parts[i] in _LAYER_WORDS and parts[i + 1].isascii() and parts[i + 1].isdigit():
            return i + 1
    return None


def layer_index(name: str) -> int | None:
    """The transformer block index in a tensor name, or None.

    It is the integer component right after a component named layers, h,
    blocks, block or layer; whole dotted components only, so "layers.1" never
    matches "layers.10". model.layers.12.mlp.up_proj.weight -> 12.
    """
    parts = name.split(".")
    pos = _layer_position(parts)
    return None if pos is None else int(parts[pos])


def with_layer_index(name: str, new_index: int) -> str:
    """`name` with its block index (see layer_index) replaced by `new_index`."""
    parts = name.split(".")
    pos = _layer_position(parts)
    if pos is None:
        raise ValueError(f"tensor {name} has no layer index to replace")
    parts[pos] = str(new_index)
    return ".".join(parts)
