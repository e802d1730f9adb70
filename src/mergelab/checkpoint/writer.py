"""Streaming, atomic writer of sharded safetensors checkpoints.

The whole output layout (name, shape, dtype of every tensor) is known before
the first tensor is merged, so every shard's header is written up front and
each tensor has a fixed byte range: tensors can then be written in any order,
whole or in row blocks, with only the tensor at hand in memory.

Everything goes into a hidden ``.<name>.partial-<pid>-<random>`` folder beside the
output folder (checked first by `mergelab.checkpoint.output.check_output`), which is renamed into place only once every tensor is written,
so a crash never leaves something that looks like a finished model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from mergelab.checkpoint.assets import copy_assets
from mergelab.checkpoint.assets import copy_file as _copy_file  # module globals: tests fill the disk through them
from mergelab.checkpoint.assets import write_file as _write_file
from mergelab.checkpoint.output import MARKER, check_output, partial_path, replace_folder
from mergelab.checkpoint.safetensors_format import DTYPE_CODES, build_header, pwrite_all, tensor_bytes
from mergelab.checkpoint.units import parse_size
from mergelab.errors import CheckpointError, InvalidInput, ShapeMismatch

__all__ = ["CheckpointWriter", "TensorInfo", "copy_assets", "parse_size", "plan_shards"]


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One output tensor of the layout."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclasses.dataclass
class _Slot:
    """Where a tensor's bytes go, and which of its rows were written so far."""

    info: TensorInfo
    shard: int
    offset: int  # absolute byte offset in the shard file
    written: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # row ranges

    @property
    def rows(self) -> int:
        return self.info.shape[0] if self.info.shape else 1

    @property
    def row_bytes(self) -> int:
        return self.info.nbytes // self.rows if self.rows else 0

    def done(self) -> bool:
        return self.info.nbytes == 0 or sum(b - a for a, b in self.written) == self.rows


def plan_shards(layout: Sequence[TensorInfo], shard_size: int) -> list[list[TensorInfo]]:
    """Greedy, in layout order: a shard closes when the next tensor would push it past shard_size."""
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for info in layout:
        if shards[-1] and size + info.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(info)
        size += info.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _check_layout(layout: Sequence[TensorInfo]) -> None:
    seen: set[str] = set()
    dupes = sorted({i.name for i in layout if i.name in seen or seen.add(i.name)})
    if dupes:
        raise CheckpointError(f"output layout names {len(dupes)} tensor(s) twice, e.g. {dupes[0]}; "
                              "every output tensor needs a unique name")
    for info in layout:
        if info.dtype not in DTYPE_CODES:
            raise CheckpointError(f"tensor {info.name}: dtype {info.dtype} cannot be stored in safetensors")
        if any(not isinstance(d, int) or d < 0 for d in info.shape):
            raise CheckpointError(f"tensor {info.name}: shape {info.shape} is not a tuple of sizes")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a folder; the data files were synced
        pass
    finally:
        os.close(fd)


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a range of a shard to disk now, without waiting for it.

    On Linux, POSIX_FADV_DONTNEED on dirty pages queues their writeback and
    returns: the disk works while the merge computes, and the fsync at the end
    has little left to wait for (and the output does not crowd out the inputs
    in the page cache).
    """
    if length >= _WRITEBACK_MIN and hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        except OSError:  # only a hint
            pass


_WRITEBACK_MIN = 1 << 20  # smaller writes are left to the kernel's own writeback


class CheckpointWriter:
    """Writes the tensors of `layout` into a sharded safetensors checkpoint at `out_dir`.

    Args:
        out_dir: the finished model's folder; it appears only when finish() succeeds.
        layout: every output tensor (name, shape, dtype), in output order.
        shard_size: bytes per shard file at most (a bigger tensor gets a shard of its own).
        overwrite: replace an existing out_dir (atomically, at finish).
        protected: input model folders or files; out_dir may not equal, be inside, or contain one.
    """

    def __init__(self, out_dir: str | Path, layout: Sequence[TensorInfo], *, shard_size: int,
                 overwrite: bool = False, protected: Sequence[Path] = ()):
        self.layout = list(layout)
        if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size <= 0:
            raise InvalidInput(f"shard_size must be a positive number of bytes, got {shard_size!r}")
        self.out_dir = check_output(out_dir, kind="folder", inputs=protected, overwrite=overwrite,
                                    what="output folder")
        _check_layout(self.layout)
        self.overwrite = overwrite
        self.skipped_assets: list[str] = []
        self._lock = threading.Lock()
        self._state = "open"  # open -> finishing -> finished, or -> aborted
        self._fds: list[int] = []
        self._slots: dict[str, _Slot] = {}
        self.temp = partial_path(self.out_dir)
        try:
            self.temp.parent.mkdir(parents=True, exist_ok=True)
            self.temp.mkdir()
            (self.temp / MARKER).write_text("written by mergelab; mergelab may replace it when told to overwrite\n")
        except OSError as exc:
            raise CheckpointError(f"cannot create {self.temp} beside the output folder "
                                  f"({exc.strerror or exc}); check the path and permissions") from exc
        try:
            self.shard_names = self._create_shards(plan_shards(self.layout, shard_size))
        except OSError as exc:
            self.abort()
            raise CheckpointError(f"cannot create shard files in {self.temp} ({exc.strerror or exc}); "
                                  "is the disk full? check free space and permissions") from exc
        except BaseException:
            self.abort()
            raise

    # -- layout --------------------------------------------------------------------
    def _create_shards(self, shards: list[list[TensorInfo]]) -> list[str]:
        names = shard_names(len(shards))
        for index, (fname, infos) in enumerate(zip(names, shards)):
            # Data in order of decreasing item size keeps every tensor aligned to
            # its element size (the format allows no padding); the header keeps
            # layout order, which is the order readers list the tensors in.
            offsets, pos = {}, 0
            for info in sorted(infos, key=lambda i: -i.dtype.itemsize):
                offsets[info.name] = pos
                pos += info.nbytes
            header = build_header(((i.name, i.dtype, i.shape, offsets[i.name], offsets[i.name] + i.nbytes)
                                   for i in infos), {"format": "pt"})
            fd = os.open(self.temp / fname, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
            self._fds.append(fd)
            pwrite_all(fd, memoryview(header), 0)
            os.ftruncate(fd, len(header) + pos)  # sparse until written
            for info in infos:
                self._slots[info.name] = _Slot(info, index, len(header) + offsets[info.name])
        return names

    # -- writing -------------------------------------------------------------------
    def _slot(self, name: str) -> _Slot:
        if self._state != "open":
            raise CheckpointError(f"cannot write tensor {name}: the writer for {self.out_dir} is {self._state}")
        if name not in self._slots:
            raise CheckpointError(f"tensor {name} is not in the output layout of {self.out_dir}")
        return self._slots[name]

    @staticmethod
    def _prepare(slot: _Slot, tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        name, info = slot.info.name, slot.info
        if tuple(tensor.shape) != shape:
            raise ShapeMismatch(f"tensor {name}: got shape {tuple(tensor.shape)}, the output layout expects {shape}")
        if tensor.dtype != info.dtype:
            raise CheckpointError(f"tensor {name}: got dtype {tensor.dtype}, the output layout expects "
                                  f"{info.dtype}; cast it before writing")
        return tensor.detach().cpu().contiguous()

    def _put(self, slot: _Slot, start: int, stop: int, tensor: torch.Tensor) -> None:
        name = slot.info.name
        with self._lock:
            clash = next(((a, b) for a, b in slot.written if a < stop and start < b), None)
            if clash is not None:
                raise CheckpointError(f"tensor {name}: rows {start}:{stop} overlap rows {clash[0]}:{clash[1]} "
                                      "written before; each row is written once")
            slot.written.append((start, stop))
        try:
            data = tensor_bytes(tensor)
            offset = slot.offset + start * slot.row_bytes
            pwrite_all(self._fds[slot.shard], data, offset)
            _start_writeback(self._fds[slot.shard], offset, len(data))
        except OSError as exc:
            with self._lock:
                slot.written.remove((start, stop))
            raise CheckpointError(f"writing tensor {name} into {self.temp} failed ({exc.strerror or exc}); "
                                  "is the disk full?") from exc

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the whole tensor `name` (shape and dtype as in the layout)."""
        slot = self._slot(name)
        self._put(slot, 0, slot.rows, self._prepare(slot, tensor, slot.info.shape))

    def write_rows(self, name: str, start_row: int, rows: torch.Tensor) -> None:
        """Write rows start_row:start_row + len(rows) of tensor `name`."""
        slot = self._slot(name)
        shape = slot.info.shape
        if not shape:
            raise CheckpointError(f"tensor {name} is a scalar; write it with write(), not write_rows()")
        stop = start_row + (rows.shape[0] if rows.dim() else 0)
        if not 0 <= start_row <= stop <= shape[0]:
            raise ShapeMismatch(f"tensor {name}: rows {start_row}:{stop} fall outside its {shape[0]} rows")
        self._put(slot, start_row, stop, self._prepare(slot, rows, (stop - start_row, *shape[1:])))

    def bytes_written(self, name: str) -> int:
        """Bytes of tensor `name` written so far."""
        slot = self._slots[name]
        return sum(b - a for a, b in slot.written) * slot.row_bytes

    # -- finishing -----------------------------------------------------------------
    def finish(self, *, assets_from: Path | None = None, config_updates: dict | None = None,
               extra_files: Mapping[str, str | bytes] | None = None,
               copy_files: Mapping[str, Path] | None = None, copy_tokenizer: bool = True) -> Path:
        """Check every tensor was written, add index, assets and extra files, and move into place.

        Args:
            assets_from: model folder to copy config.json, generation_config.json,
                tokenizer and sentence-transformers files from (never weights).
            config_updates: top-level keys to set in the copied config.json.
            extra_files: relative path -> content, written last (they win over copied files).
            copy_tokenizer: copy the tokenizer's files with the config (False: config only).
            copy_files: relative path -> file to copy in (e.g. optimizer state for resuming);
                copied into the temporary folder, so they are there before it is renamed.

        Returns:
            out_dir, now holding the finished model.
        """
        if self._state != "open":
            raise CheckpointError(f"cannot finish the writer for {self.out_dir}: it is {self._state}")
        missing = [s.info.name for s in self._slots.values() if not s.done()]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise CheckpointError(f"{len(missing)} output tensor(s) were not fully written: "
                                  f"{', '.join(missing[:5])}{more}; the output {self.out_dir} was not created")
        self._state = "finishing"
        try:
            self._close_shards()
            if len(self.shard_names) > 1:
                _write_file(self.temp / "model.safetensors.index.json", self._index_json())
            if assets_from is not None:
                self.skipped_assets += copy_assets(Path(assets_from), self.temp, config_updates or {},
                                                   tokenizer=copy_tokenizer)
            for rel, src in (copy_files or {}).items():
                _copy_file(Path(src), self._extra_path(rel))
            for rel, content in (extra_files or {}).items():
                _write_file(self._extra_path(rel), content.encode("utf-8") if isinstance(content, str) else content)
            _fsync_path(self.temp)
            self._move_into_place()
        except OSError as exc:
            raise CheckpointError(f"finishing {self.out_dir} failed ({exc.strerror or exc}); is the disk full? "
                                  "nothing was written there") from exc
        self._state = "finished"
        return self.out_dir

    def _index_json(self) -> bytes:
        index = {
            "metadata": {"total_size": sum(i.nbytes for i in self.layout),
                         "total_parameters": sum(math.prod(i.shape) for i in self.layout)},
            "weight_map": {name: self.shard_names[slot.shard] for name, slot in self._slots.items()},
        }
        return (json.dumps(index, indent=2) + "\n").encode("utf-8")

    def _extra_path(self, rel: str) -> Path:
        parts = Path(rel).parts
        if not parts or Path(rel).is_absolute() or ".." in parts:
            raise CheckpointError(f"extra file name {rel!r} must be a relative path inside the output folder")
        if rel in self.shard_names or rel == "model.safetensors.index.json":
            raise CheckpointError(f"extra file {rel!r} would replace a weight file of the output")
        return self.temp / rel

    def _close_shards(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _move_into_place(self) -> None:
        replace_folder(self.temp, self.out_dir, overwrite=self.overwrite)

    def abort(self) -> None:
        """Delete the temporary folder and everything in it; safe to call more than once."""
        if self._state == "finished":
            return
        self._state = "aborted"
        fds, self._fds = self._fds, []
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.temp, ignore_errors=True)

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # On an exception, or when the block ends without finish(): nothing is kept.
        if self._state != "finished":
            self.abort()

    def __del__(self) -> None:
        # Dropped without finish() or abort(): free the descriptors; the
        # .partial folder stays, as it would if the process had died.
        for fd in getattr(self, "_fds", []):
            try:
                os.close(fd)
            except OSError:
                pass
