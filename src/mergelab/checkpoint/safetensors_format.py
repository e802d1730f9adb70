"""The safetensors file format, parsed and produced without the safetensors library.

A file is: 8 bytes little-endian u64 N, N bytes of JSON header, then the data
buffer. The header maps each tensor name to {"dtype", "shape", "data_offsets":
[begin, end]} (offsets relative to the start of the data buffer) and may hold
"__metadata__": {str: str}. The buffer is covered by the tensors exactly, with
no holes and no overlaps (read_header refuses any other file).

We parse it ourselves so that a tensor can be read with one positioned read
into a tensor we allocated (no mmap, no page of the file held resident), and
so that a shard's header can be written before any tensor data exists.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from mergelab.checkpoint.file_state import FileState, open_regular
from mergelab.errors import CheckpointError
from mergelab.jsonfile import has_control_characters, no_duplicate_keys, parse_json, shown

# safetensors dtype code -> torch dtype. Float8 and unsigned types are included
# only when this torch build has them.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                     ("F8_E8M0", "float8_e8m0fnu"), ("U16", "uint16"), ("U32", "uint32"),
                     ("U64", "uint64")):
    if hasattr(torch, _attr):
        DTYPES[_code] = getattr(torch, _attr)

# torch dtype -> safetensors dtype code (the inverse of DTYPES).
DTYPE_CODES: dict[torch.dtype, str] = {dt: code for code, dt in DTYPES.items()}

# The safetensors library refuses headers above 100 MB; so do we, since a bigger
# length field almost always means the file is not safetensors at all.
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file: where its bytes are (absolute file offsets)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _corrupt(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: {what}; the file looks truncated or corrupt (re-download or re-save it)")


def _index_list(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


# Bounds that keep a valid-looking header from making torch fail: strides must fit in int64.
MAX_DIMS = 64
_MAX_ELEMENTS = 2**62


def _entry(path: Path, name: str, info: object, data_start: int) -> Entry:
    """Validate one header entry and turn it into an Entry with absolute offsets."""
    if has_control_characters(name):
        raise _corrupt(path, f"tensor name '{shown(name)}' holds control characters (a newline, NUL, ...)")
    name_shown = shown(name)
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise _corrupt(path, f"tensor {name_shown}: header entry lacks dtype/shape/data_offsets")
    code = info["dtype"]
    if not isinstance(code, str) or code not in DTYPES:
        raise CheckpointError(
            f"{path}: tensor {name_shown} has dtype {str(code)[:40]!r}, which mergelab cannot read "
            f"(known: {', '.join(DTYPES)})")
    shape, offsets = info["shape"], info["data_offsets"]
    if not (_index_list(shape) and _index_list(offsets) and len(offsets) == 2):
        raise _corrupt(path, f"tensor {name_shown}: shape {str(shape)[:80]} or data_offsets {str(offsets)[:80]} "
                             "are not lists of non-negative integers")
    if len(shape) > MAX_DIMS or math.prod(max(d, 1) for d in shape) > _MAX_ELEMENTS:
        raise _corrupt(path, f"tensor {name_shown}: shape {str(shape)[:80]} is impossibly large")
    begin, end = offsets
    dtype = DTYPES[code]
    want = math.prod(shape) * dtype.itemsize
    if end - begin != want:
        raise _corrupt(path, f"tensor {name_shown}: data_offsets {offsets} span {end - begin} bytes but "
                             f"shape {shape} of {code} needs {want}")
    return Entry(name, dtype, tuple(shape), data_start + begin, data_start + end)


def read_header(path: Path) -> tuple[list[Entry], dict[str, str], FileState]:
    """Read and validate the header of the safetensors file at `path`.

    Returns the entries in header order, the __metadata__ dict and the file's
    FileState when the header was read. Raises CheckpointError naming the file
    (and tensor) if the header is malformed (bad length, not UTF-8, not a JSON
    object, nested, duplicate names, unknown dtype, bad shape/offsets) or the
    data buffer does not match it: a tensor past the end of the file (e.g.
    because it was cut short), overlapping tensors, a hole between tensors, or
    bytes after the last one.
    """
    fd, info = open_regular(path)
    size = info.st_size
    try:
        prefix = os.pread(fd, 8, 0)
        if len(prefix) < 8:
            raise _corrupt(path, f"only {size} bytes, shorter than the 8-byte header length")
        (hlen,) = struct.unpack("<Q", prefix)
        if hlen < 2 or hlen > MAX_HEADER_BYTES or 8 + hlen > size:
            raise _corrupt(path, f"header length {hlen} does not fit a file of {size} bytes")
        raw = bytearray(hlen)
        pread_into(fd, memoryview(raw), 8)
    except (OSError, EOFError) as exc:
        raise CheckpointError(f"{path}: cannot be read ({getattr(exc, 'strerror', None) or exc}); "
                              "the file looks truncated or is being written") from None
    finally:
        os.close(fd)
    header = parse_json(bytes(raw), path, "safetensors header", expect=dict, object_pairs_hook=no_duplicate_keys,
                        advice="the file looks truncated or corrupt (re-download or re-save it)")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupt(path, "__metadata__ is not a JSON object of strings")
    data_start = 8 + hlen
    entries = [_entry(path, name, info, data_start) for name, info in header.items()]
    _check_coverage(path, entries, data_start, size)
    return entries, metadata, FileState.of(info)


def parse_header(path: Path) -> tuple[list[Entry], dict[str, str]]:
    """The entries in header order and the __metadata__ dict of the safetensors file at `path` (see read_header)."""
    entries, metadata, _ = read_header(path)
    return entries, metadata


def _check_coverage(path: Path, entries: Sequence[Entry], data_start: int, size: int) -> None:
    """The tensors must cover the data buffer exactly: from its start, no overlap, no hole, to the file's end."""
    pos, previous = data_start, None
    for entry in sorted(entries, key=lambda e: (e.begin, e.end)):
        if entry.end > size:
            raise _corrupt(path, f"tensor {shown(entry.name)} ends at byte {entry.end} but the file has "
                                 f"only {size} bytes")
        if entry.begin < pos:
            raise _corrupt(path, f"tensors {shown(previous.name) if previous else '(header)'} and {shown(entry.name)} overlap")
        if entry.begin > pos:
            after = f"after tensor {shown(previous.name)}" if previous else "at the start of the data buffer"
            raise _corrupt(path, f"{entry.begin - pos} bytes {after} belong to no tensor (a hole before "
                                 f"tensor {shown(entry.name)})")
        pos, previous = entry.end, entry
    if pos != size:
        after = f"after the last tensor ({shown(previous.name)})" if previous else "after the header (no tensors)"
        raise _corrupt(path, f"{size - pos} bytes {after} belong to no tensor")


def build_header(items: Iterable[tuple[str, torch.dtype, Sequence[int], int, int]],
                 metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length plus JSON header for (name, dtype, shape, begin, end) items.

    Offsets are relative to the data buffer. The JSON is padded with spaces to a
    multiple of 8 bytes, as the safetensors library does, so the data buffer
    starts 8-byte aligned.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    for name, dtype, shape, begin, end in items:
        header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [begin, end]}
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A flat byte view of a contiguous CPU tensor's data (no copy; works for bf16 and fp8)."""
    flat = tensor.reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def pread_into(fd: int, buffer: memoryview, offset: int) -> None:
    """Fill `buffer` from file offset `offset`, looping over short reads."""
    done = 0
    while done < len(buffer):
        n = os.preadv(fd, [buffer[done:]], offset + done)
        if n == 0:
            raise EOFError(f"unexpected end of file at byte {offset + done}")
        done += n


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of `data` at file offset `offset`, looping over short writes."""
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)
