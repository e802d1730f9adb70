"""Reading and writing model weights: the only part of mergelab that touches weight files.

`Checkpoint` gives lazy, per-tensor access to a model on disk; `CheckpointWriter`
streams tensors into a sharded safetensors folder that appears atomically.
Whole small files (statistics, adapters, training state) go through
tensor_file, state_file and peft.
"""

from mergelab.checkpoint.layers import layer_index, with_layer_index
from mergelab.checkpoint.reader import Checkpoint
from mergelab.checkpoint.safetensors_format import DTYPE_CODES, DTYPES
from mergelab.checkpoint.units import parse_dtype, parse_size
from mergelab.checkpoint.writer import CheckpointWriter, TensorInfo

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
