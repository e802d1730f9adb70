"""mergelab: merge neural networks by combining their weights."""

__version__ = "0.1.0"

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
