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
import mmap
import os
import struct
import stat
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

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


@dataclasses.dataclass(frozen=True)
class FileState:
    """What identifies one version of a file: compared to notice it changed under us."""

    size: int
    mtime_ns: int
    inode: int
    device: int

    @classmethod
    def of(cls, info: os.stat_result) -> FileState:
        return cls(info.st_size, info.st_mtime_ns, info.st_ino, info.st_dev)


def check_path_unchanged(path: Path, state: "FileState") -> None:
    """Raise CheckpointError if the file now at `path` is not the one whose state was recorded (or is gone)."""
    try:
        now: FileState | None = FileState.of(os.stat(path))
    except FileNotFoundError:
        now = None
    if now != state:
        raise changed_error(path, state, now)


def changed_error(path: Path, before: FileState, now: FileState | None) -> CheckpointError:
    """The error for an input that is not the file that was opened any more."""
    if now is None:
        what = "was deleted"
    elif (now.inode, now.device) != (before.inode, before.device):
        what = "was replaced by another file"
    elif now.size < before.size:
        what = f"was truncated from {before.size} to {now.size} bytes"
    elif now.size != before.size:
        what = f"grew from {before.size} to {now.size} bytes"
    else:
        what = "was modified"
    return CheckpointError(
        f"{path}: file changed or was truncated while reading (it {what} after mergelab opened it); "
        "its tensors cannot be trusted - wait until whatever is changing it has finished (or restore it), "
        "then run again")


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


def _open_regular(path: Path) -> tuple[int, os.stat_result]:
    """A read-only descriptor of the regular file at `path` and its stat; refuses FIFOs, devices, folders."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be opened ({exc.strerror or exc})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise CheckpointError(f"{path}: is not a regular file (a folder, pipe or device); give the "
                              "weight file itself")
    return fd, info


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
    fd, info = _open_regular(path)
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


class SafetensorsFile:
    """One safetensors file: header parsed and checked on construction, tensors read on demand.

    A file descriptor is opened on the first read and kept until close(); reads
    use positioned I/O, so one descriptor serves several threads.

    The file must stay as it was when the header was read (its FileState, in
    `state`). A change is reported as CheckpointError "file changed or was
    truncated while reading" by: opening the descriptor (a file replaced in
    between), every read, view() and advise() (one fstat each), a short read,
    a failing MADV_POPULATE_READ, and check_unchanged() (which also notices the
    path now naming another file, or none).

    What no check can catch: view() returns a tensor over the file's memory
    map, whose pages are read when the caller touches them. If the file is
    truncated after the last check and before that touch, the kernel sends
    SIGBUS and the process dies (exit code 135) without a Python traceback;
    Python cannot turn that signal into an exception. Callers narrow the window
    by prefetching with advise(MADV_POPULATE_READ) (which turns a truncation
    into this error) and calling check_unchanged() right before use.
    """

    def __init__(self, path: Path):
        self.path = path
        entries, self.metadata, self.state = read_header(path)
        self.entries: dict[str, Entry] = {e.name: e for e in entries}
        self._fd: int | None = None
        self._map: mmap.mmap | None = None
        self._lock = threading.Lock()

    def _descriptor(self) -> int:
        with self._lock:
            if self._fd is None:
                fd, info = _open_regular(self.path)
                if FileState.of(info) != self.state:
                    os.close(fd)
                    raise changed_error(self.path, self.state, FileState.of(info))
                self._fd = fd
            return self._fd

    def _verify(self, fd: int) -> None:
        """Raise if the open file is not as it was when its header was read (one fstat)."""
        now = FileState.of(os.fstat(fd))
        if now != self.state:
            raise changed_error(self.path, self.state, now)

    def check_unchanged(self) -> None:
        """Raise CheckpointError if the file at `path`, or the open one, differs from when it was opened."""
        check_path_unchanged(self.path, self.state)
        with self._lock:
            if self._fd is not None:
                self._verify(self._fd)

    def _fill(self, out: torch.Tensor, offset: int, name: str) -> torch.Tensor:
        if out.numel() == 0:
            return out
        fd = self._descriptor()
        self._verify(fd)
        try:
            pread_into(fd, tensor_bytes(out), offset)
        except (OSError, EOFError) as exc:
            self._verify(fd)
            raise CheckpointError(
                f"{self.path}: reading tensor {shown(name)} failed ({exc}); the file was probably "
                "truncated or replaced after it was opened") from exc
        self._verify(fd)  # changed while we read it: what we read may be half old, half new
        return out

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """`name`, read with one positioned read (no mmap) into `out` or a new tensor."""
        entry = self.entries[name]
        return self._fill(torch.empty(entry.shape, dtype=entry.dtype) if out is None else out, entry.begin, name)

    def _mapping(self) -> mmap.mmap:
        fd = self._descriptor()
        with self._lock:
            self._verify(fd)  # mapped at the size the header was checked against, and checked at each use
            if self._map is None:
                # Private (copy-on-write) mapping: tensors viewing it are writable in
                # memory, but nothing can ever reach the file.
                self._map = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
            return self._map

    def view(self, name: str) -> torch.Tensor:
        """`name` as a tensor over the file's pages in the page cache: no read and no copy.

        Falls back to read() where a view cannot be made (empty tensors, data not
        aligned to its element size). See the class docstring for what happens
        if the file is truncated while the view is in use.
        """
        entry = self.entries[name]
        if entry.nbytes == 0 or entry.begin % entry.dtype.itemsize:
            return self.read(name)
        raw = torch.frombuffer(self._mapping(), dtype=torch.uint8, count=entry.nbytes, offset=entry.begin)
        return raw.view(entry.dtype).reshape(entry.shape)

    def advise(self, name: str, advice: int, rows: tuple[int, int] | None = None) -> bool:
        """madvise() the pages of `name` (or of its rows start:stop); False if the system refused the advice.

        Raises CheckpointError instead when the file changed since it was opened
        (a truncated file makes MADV_POPULATE_READ fail with EFAULT).
        """
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
            with self._lock:
                if self._fd is not None:
                    self._verify(self._fd)  # ... unless the pages are gone: the file shrank
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
