"""Optional dependencies: import one where a feature needs it, or say which extra installs it.

The library runs on torch, numpy, safetensors, pydantic, typer and rich. Plots
(matplotlib), permutation alignment (scipy's assignment solver) and the compiled
kernels (numba) are extras; a feature that needs one calls `require` first, so
the user reads which extra to install instead of an ImportError traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from mergelab.errors import MergeError

EXTRA_OF = {"matplotlib": "plots", "scipy": "align", "numba": "fast", "sklearn": "demo"}


class MissingExtra(MergeError):
    """A feature needs an optional package that is not installed."""


def require(module: str, feature: str) -> ModuleType:
    """Import `module` (e.g. "matplotlib.figure"), or raise MissingExtra naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        extra = EXTRA_OF.get(top)
        how = f"pip install 'mergelab[{extra}]'" if extra else f"pip install {top}"
        raise MissingExtra(f"{feature} needs {top}, which cannot be imported here ({exc}); install it: {how}") \
            from exc
