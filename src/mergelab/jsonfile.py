"""Reading JSON that came from somewhere else (a download, a training run) without trusting it.

Every JSON file mergelab reads goes through `read_json_file` (or `parse_json`
for bytes already read, such as a safetensors header), so that whatever the
file holds, the caller gets either the parsed value or one error naming the
file and what to do: never a RecursionError, a UnicodeDecodeError, a hang on a
FIFO, or a multi-gigabyte read.

Limits: a file bigger than `max_bytes` is refused before it is read, and
values nested deeper than `max_depth` are refused (the json module would
raise RecursionError near depth 1000; real configs nest fewer than 10 deep).
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mergelab.errors import CheckpointError, MergeError

__all__ = ["MAX_JSON_BYTES", "MAX_JSON_DEPTH", "has_control_characters", "no_duplicate_keys", "parse_json",
           "read_json_file", "shown"]

MAX_JSON_BYTES = 100 * 1024 * 1024  # the safetensors library's header limit; configs are kilobytes
MAX_JSON_DEPTH = 64


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def has_control_characters(text: str) -> bool:
    """Whether `text` holds a character that would break a one-line message (newline, escape, NUL, ...)."""
    return _CONTROL.search(text) is not None


def shown(text: object, limit: int = 200) -> str:
    """A value read from an untrusted file, fit for a one-line message: control characters escaped, cut to `limit`."""
    text = str(text)
    if has_control_characters(text):
        text = _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)
    return text if len(text) <= limit else text[:limit] + "..."


def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """object_pairs_hook refusing an object with the same key twice (json.loads keeps the last silently)."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0), counted without recursion; stops past `limit`."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        depth += 1
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        stack.extend((child, depth) for child in children if isinstance(child, (dict, list)))
    return deepest


def parse_json(raw: bytes, source: str | Path, what: str, *, max_depth: int = MAX_JSON_DEPTH,
               expect: type | None = None, object_pairs_hook: Callable | None = None,
               error: type[MergeError] = CheckpointError, advice: str = "fix or re-download it") -> Any:
    """`raw` (UTF-8 JSON bytes read from `source`) parsed, or `error` naming `source` and `what` it is.

    expect: dict or list to require that type at the top level.
    object_pairs_hook: passed to json.loads (e.g. no_duplicate_keys); a
        ValueError it raises is reported like a syntax error.
    advice: what the user should do, ending every message.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{source}: this {what} is not UTF-8 text (byte {exc.start} is {raw[exc.start]:#04x}); "
                    f"{advice}") from None
    try:
        value = json.loads(text, object_pairs_hook=object_pairs_hook)
    except RecursionError:
        raise error(f"{source}: this {what} nests JSON values too deeply to be a real {what} "
                    f"(limit {max_depth}); {advice}") from None
    except ValueError as exc:  # JSONDecodeError, a hook's ValueError, an integer of too many digits
        raise error(f"{source}: this {what} is not valid JSON ({str(exc)[:200]}); {advice}") from None
    if _depth(value, max_depth) > max_depth:
        raise error(f"{source}: this {what} nests JSON values more than {max_depth} deep, which no real "
                    f"{what} does; {advice}")
    if expect is not None and not isinstance(value, expect):
        kind = {dict: "an object ({...})", list: "a list ([...])"}.get(expect, expect.__name__)
        raise error(f"{source}: this {what} is a JSON {_json_type(value)}, not {kind}; {advice}")
    return value


def _json_type(value: Any) -> str:
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "list"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number"


def read_json_file(path: str | Path, what: str, *, max_bytes: int = MAX_JSON_BYTES,
                   max_depth: int = MAX_JSON_DEPTH, expect: type | None = None,
                   object_pairs_hook: Callable | None = None, error: type[MergeError] = CheckpointError,
                   advice: str = "fix or re-download it") -> Any:
    """The JSON value in the file at `path`, or one `error` naming the file, `what` it is, and `advice`.

    Refuses, before reading: a missing file, a folder, anything that is not a
    regular file (a FIFO would block forever), a file over `max_bytes`. Then
    see parse_json for encoding, syntax, depth and `expect`.
    Example: read_json_file(folder / "trainer_state.json", "trainer state", expect=dict,
    error=StatsError, advice="it should be the file transformers' Trainer wrote").
    """
    path = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; reads of regular files ignore it.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{path}: this {what} does not exist") from None
    except OSError as exc:
        raise error(f"{path}: this {what} cannot be opened ({exc.strerror or exc})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file"
            raise error(f"{path}: this {what} is {kind}; it should be a JSON file")
        if info.st_size > max_bytes:
            raise error(f"{path}: this {what} is {info.st_size} bytes, more than the {max_bytes} a "
                        f"{what} can sensibly be; {advice}")
        chunks, total = [], 0
        while total <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > max_bytes:  # grew while we read it
            raise error(f"{path}: this {what} is more than {max_bytes} bytes; {advice}")
    except OSError as exc:
        raise error(f"{path}: this {what} cannot be read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    return parse_json(b"".join(chunks), path, what, max_depth=max_depth, expect=expect,
                      object_pairs_hook=object_pairs_hook, error=error, advice=advice)
