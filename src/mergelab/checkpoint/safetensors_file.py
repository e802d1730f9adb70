"""One safetensors file read on demand: positioned reads into fresh tensors, or views of its memory map."""

from __future__ import annotations

import mmap
import os
import threading
from pathlib import Path

import torch

from mergelab.checkpoint.file_state import FileState, changed_error, check_path_unchanged, open_regular
from mergelab.checkpoint.safetensors_format import Entry, pread_into, read_header, tensor_bytes
from mergelab.errors import CheckpointError
from mergelab.jsonfile import shown

__all__ = ["SafetensorsFile"]


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
                fd, info = open_regular(self.path)
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
