"""The safetensors file format, parsed and produced without the safetensors library.

A file is: 8 bytes little-endian u64 N, N bytes of JSON header, then the data
buffer. The header maps each tensor name to {"dtype", "shape", "data_offsets":
[begin, end]} (offsets relative to the start of the data buffer) and may hold
"__metadata__": {str: str}. The buffer is covered by the tensors exactly, with
no holes and no overlaps.

We parse it ourselves so that a tensor can be read with one positioned read
into a tensor we allocated (no mmap, no page of the file held resident), and
so that a shard's header can be written before any tensor data exists.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import struct
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from mergelab.errors import CheckpointError

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


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    # json.loads keeps the last of two equal keys silently; a duplicate tensor
    # name means the header is damaged, so keep the pairs to check them.
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def _index_list(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def _entry(path: Path, name: str, info: object, data_start: int) -> Entry:
    """Validate one header entry and turn it into an Entry with absolute offsets."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise _corrupt(path, f"tensor {name}: header entry lacks dtype/shape/data_offsets")
    code = info["dtype"]
    if not isinstance(code, str) or code not in DTYPES:
        raise CheckpointError(
            f"{path}: tensor {name} has dtype {code!r}, which mergelab cannot read "
            f"(known: {', '.join(DTYPES)})")
    shape, offsets = info["shape"], info["data_offsets"]
    if not (_index_list(shape) and _index_list(offsets) and len(offsets) == 2):
        raise _corrupt(path, f"tensor {name}: shape {shape!r} or data_offsets {offsets!r} are not "
                             "lists of non-negative integers")
    begin, end = offsets
    dtype = DTYPES[code]
    want = math.prod(shape) * dtype.itemsize
    if end - begin != want:
        raise _corrupt(path, f"tensor {name}: data_offsets {offsets} span {end - begin} bytes but "
                             f"shape {shape} of {code} needs {want}")
    return Entry(name, dtype, tuple(shape), data_start + begin, data_start + end)


def parse_header(path: Path) -> tuple[list[Entry], dict[str, str]]:
    """Read and validate the header of the safetensors file at `path`.

    Returns the entries in header order and the __metadata__ dict. Raises
    CheckpointError naming the file (and tensor) if the header is malformed or
    the data buffer does not match it, e.g. because the file was cut short.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise _corrupt(path, f"only {size} bytes, shorter than the 8-byte header length")
            (hlen,) = struct.unpack("<Q", prefix)
            if hlen < 2 or hlen > MAX_HEADER_BYTES or 8 + hlen > size:
                raise _corrupt(path, f"header length {hlen} does not fit a file of {size} bytes")
            raw = fh.read(hlen)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _corrupt(path, f"header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _corrupt(path, "__metadata__ is not a JSON object")
    data_start = 8 + hlen
    entries = [_entry(path, name, info, data_start) for name, info in header.items()]
    _check_coverage(path, entries, size)
    return entries, {str(k): str(v) for k, v in metadata.items()}


def _check_coverage(path: Path, entries: Sequence[Entry], size: int) -> None:
    """The tensors must not overlap and must all lie inside the file."""
    previous: Entry | None = None
    for entry in sorted(entries, key=lambda e: (e.begin, e.end)):
        if previous is not None and entry.begin < previous.end:
            raise _corrupt(path, f"tensors {previous.name} and {entry.name} overlap")
        if entry.end > size:
            raise _corrupt(path, f"tensor {entry.name} ends at byte {entry.end} but the file has "
                                 f"only {size} bytes")
        previous = entry


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


class SafetensorsFile:
    """One safetensors file: header parsed and checked on construction, tensors read on demand.

    A file descriptor is opened on the first read and kept until close(); reads
    use positioned I/O, so one descriptor serves several threads.
    """

    def __init__(self, path: Path):
        self.path = path
        entries, self.metadata = parse_header(path)
        self.entries: dict[str, Entry] = {e.name: e for e in entries}
        self._fd: int | None = None
        self._map: mmap.mmap | None = None
        self._lock = threading.Lock()

    def _descriptor(self) -> int:
        with self._lock:
            if self._fd is None:
                try:
                    self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                except OSError as exc:
                    raise CheckpointError(f"{self.path}: cannot be opened ({exc.strerror or exc})") from exc
            return self._fd

    def _fill(self, out: torch.Tensor, offset: int, name: str) -> torch.Tensor:
        if out.numel() == 0:
            return out
        try:
            pread_into(self._descriptor(), tensor_bytes(out), offset)
        except (OSError, EOFError) as exc:
            raise CheckpointError(
                f"{self.path}: reading tensor {name} failed ({exc}); the file was probably "
                "truncated or replaced after it was opened") from exc
        return out

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """`name`, read with one positioned read (no mmap) into `out` or a new tensor."""
        entry = self.entries[name]
        return self._fill(torch.empty(entry.shape, dtype=entry.dtype) if out is None else out, entry.begin, name)

    def read_rows(self, name: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows start:stop of dim 0 of `name` (one contiguous byte range of the file), into `out` or a new tensor."""
        entry = self.entries[name]
        row_bytes = entry.nbytes // entry.shape[0] if entry.shape[0] else 0
        if out is None:
            out = torch.empty((stop - start, *entry.shape[1:]), dtype=entry.dtype)
        return self._fill(out, entry.begin + start * row_bytes, name)

    def _mapping(self) -> mmap.mmap:
        fd = self._descriptor()
        with self._lock:
            if self._map is None:
                # Private (copy-on-write) mapping: tensors viewing it are writable in
                # memory, but nothing can ever reach the file.
                self._map = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
            return self._map

    def view(self, name: str) -> torch.Tensor:
        """`name` as a tensor over the file's pages in the page cache: no read and no copy.

        Falls back to read() where a view cannot be made (empty tensors, data not
        aligned to its element size).
        """
        entry = self.entries[name]
        if entry.nbytes == 0 or entry.begin % entry.dtype.itemsize:
            return self.read(name)
        raw = torch.frombuffer(self._mapping(), dtype=torch.uint8, count=entry.nbytes, offset=entry.begin)
        return raw.view(entry.dtype).reshape(entry.shape)

    def advise(self, name: str, advice: int, rows: tuple[int, int] | None = None) -> bool:
        """madvise() the pages of `name` (or of its rows start:stop); False if the system refused the advice."""
        entry = self.entries[name]
        if entry.nbytes == 0 or entry.begin % entry.dtype.itemsize:  # never viewed through the map
            return True
        mapping = self._mapping()
        if not hasattr(mapping, "madvise"):
            return False
        begin, end = entry.begin, entry.end
        if rows is not None and entry.shape and entry.shape[0]:
            row_bytes = entry.nbytes // entry.shape[0]
            begin, end = entry.begin + rows[0] * row_bytes, entry.begin + rows[1] * row_bytes
        start = begin - begin % mmap.PAGESIZE
        try:
            mapping.madvise(advice, start, end - start)
        except (OSError, ValueError):  # advice unknown to this kernel: it was only a hint
            return False
        return True

    def close(self) -> None:
        with self._lock:
            if self._map is not None:
                try:
                    self._map.close()
                except BufferError:  # tensors still view it: it goes when the last one does
                    pass
                self._map = None
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
