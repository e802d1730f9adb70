"""mergelab: merge neural networks by combining their weights."""

__version__ = "0.1.0"

import os

# Before torch is first imported: ask its CPU allocator for 2 MB-aligned big
# buffers marked for transparent huge pages. Merging allocates and frees
# tensors of hundreds of MB per job; with 4 KB pages the kernel's page faults
# and zeroing took a third of a TinyLlama merge's time. Set it to 0 to opt out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from mergelab.api import merge, merge_state_dicts, merge_tensors, methods  # noqa: E402
from mergelab.errors import (  # noqa: E402
    CheckpointError,
    MergeError,
    RecipeError,
    ShapeMismatch,
    StatsError,
)

__all__ = [
    "merge",
    "merge_state_dicts",
    "merge_tensors",
    "methods",
    "MergeError",
    "RecipeError",
    "CheckpointError",
    "ShapeMismatch",
    "StatsError",
]
