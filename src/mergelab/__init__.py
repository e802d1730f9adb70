"""mergelab: merge neural networks by combining their weights.

Importing the package has no side effects: the public functions load their
modules (and torch) on first use, and the process environment is left alone.
"""

from __future__ import annotations

import sys
import types

from mergelab.errors import (
    CheckpointError,
    MergeError,
    RecipeError,
    ShapeMismatch,
    StatsError,
)

from mergelab.version import __version__  # noqa: E402  (re-exported)

_API = ("merge", "merge_state_dicts", "merge_tensors", "methods", "task_model", "adamerging")

__all__ = [*_API, "MergeError", "RecipeError", "CheckpointError", "ShapeMismatch", "StatsError"]


class _Package(types.ModuleType):
    """`mergelab.methods` is both a function of the API and a subpackage; the
    function wins on attribute access, so importing the subpackage later (which
    tries to set the attribute) cannot shadow it."""

    @property
    def methods(self):
        from mergelab.api import methods

        return methods

    @methods.setter
    def methods(self, value) -> None:
        if not isinstance(value, types.ModuleType):
            raise AttributeError("mergelab.methods is the API function; it cannot be replaced")

    def __getattr__(self, name: str):
        if name in _API:
            from mergelab import api

            return getattr(api, name)
        raise AttributeError(f"module 'mergelab' has no attribute {name!r}")


sys.modules[__name__].__class__ = _Package
