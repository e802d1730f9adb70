"""The method catalog for `mergelab methods`, answered without importing torch.

Every method module imports torch, which takes seconds to load; listing
methods needs only their names, parameters and docstrings. The first run
imports the registry and saves `mergelab.methods()` as JSON in the user's cache
folder ($MERGELAB_CACHE, else $XDG_CACHE_HOME/mergelab, else
~/.cache/mergelab), under a name holding the version and a hash of the method
sources; later runs read it. An edited or added method file changes the hash,
so a stale catalog is never read. Nothing else is cached.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import mergelab


def _methods_folder() -> Path:
    return Path(mergelab.__file__).parent / "methods"


def fingerprint() -> str:
    """sha256 of every method source file (path and content), so any edit makes a new catalog."""
    h = hashlib.sha256(mergelab.__version__.encode())
    root = _methods_folder()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:20]


def cache_dir() -> Path:
    if os.environ.get("MERGELAB_CACHE"):
        return Path(os.environ["MERGELAB_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "mergelab"


def catalog_path() -> Path:
    return cache_dir() / f"methods-{mergelab.__version__}-{fingerprint()}.json"


def method_catalog() -> dict[str, dict[str, Any]]:
    """name -> description (as `mergelab.methods()`), from the cache when it is current."""
    path = catalog_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and all(isinstance(v, dict) and "parameters" in v for v in data.values()):
            return data
    except (OSError, ValueError):
        pass
    data = mergelab.methods()  # imports torch: the slow path, once per version of the method sources
    _save(path, data)
    return data


def _save(path: Path, data: dict) -> None:
    """Write the catalog atomically; an unwritable cache only costs the next run its speed."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp.write_text(json.dumps(data), encoding="utf-8")
        os.replace(temp, path)
    except OSError:
        try:
            temp.unlink(missing_ok=True)
        except OSError:
            pass
