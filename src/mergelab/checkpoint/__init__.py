"""Reading and writing model weights: the only part of mergelab that touches weight files.

`Checkpoint` gives lazy, per-tensor access to a model on disk; `CheckpointWriter`
streams tensors into a sharded safetensors folder that appears atomically.
"""

from mergelab.checkpoint.reader import (
    DTYPE_CODES,
    DTYPES,
    Checkpoint,
    layer_index,
    parse_dtype,
    with_layer_index,
)
from mergelab.checkpoint.writer import CheckpointWriter, TensorInfo, parse_size

__all__ = [
    "Checkpoint",
    "CheckpointWriter",
    "DTYPES",
    "DTYPE_CODES",
    "TensorInfo",
    "layer_index",
    "parse_dtype",
    "parse_size",
    "with_layer_index",
]
