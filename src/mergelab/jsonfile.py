"""Reading small JSON files users hand us (trainer state, configs) with one clear error for any defect."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mergelab.errors import CheckpointError

# JSON beside a model is small; anything bigger is not what it claims to be.
MAX_JSON_BYTES = 64 * 1024 * 1024


def parse_json(text: str | bytes, where: str) -> Any:
    """json.loads with every failure (syntax, encoding, nesting too deep) as CheckpointError naming `where`."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text)
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{where}: is not UTF-8 text ({exc.reason} at byte {exc.start}); fix or replace it") from None
    except RecursionError:
        raise CheckpointError(f"{where}: JSON nested too deeply to be a real file; fix or replace it") from None
    except ValueError as exc:
        raise CheckpointError(f"{where}: is not valid JSON ({exc}); fix or replace it") from None


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """Read and parse a JSON file; CheckpointError names the file for any defect."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise CheckpointError(f"{path}: {what} of {size / 1e6:.0f} MB is far larger than such a file can be; "
                                  "check the path")
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    return parse_json(data, f"{path} ({what})")
