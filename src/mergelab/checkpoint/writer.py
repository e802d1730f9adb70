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
import re
import shutil
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mergelab.checkpoint.safetensors_format import DTYPE_CODES, build_header, pwrite_all, tensor_bytes
from mergelab.checkpoint.reader import asset_file, module_files
from mergelab.checkpoint.output import MARKER, check_output, partial_path, replace_folder
from mergelab.errors import CheckpointError, InvalidInput, ShapeMismatch
from mergelab.jsonfile import read_json_file

__all__ = ["CheckpointWriter", "TensorInfo", "parse_size"]

# Files copied from the model folder given as assets_from (weights never are).
ASSET_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
               "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
               "chat_template.json", "modules.json", "sentence_bert_config.json",
               "config_sentence_transformers.json")
# The tokenizer's files among ASSET_FILES (left out with copy_tokenizer=False, MergeKit's --no-copy-tokenizer).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model", "vocab.txt", "vocab.json", "merges.txt",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")

# Byte units, unambiguous: decimal (KB, MB, GB, TB, as transformers counts) and binary (KiB ...).
_BYTE_UNITS = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
# MergeKit's spelling (its parse_kmb): K, M, B = thousand, million, billion, case-insensitive.
# MergeKit documents the number as "parameters per shard" but its writer compares it with
# each tensor's numel x element_size, i.e. bytes; we do the same so shards match MergeKit's.
_KMB = {"k": 10**3, "m": 10**6, "b": 10**9}
_MAX_SIZE = 2**62


def parse_size(value: str | int) -> int:
    """Bytes per output shard from "5GB", "500MB", "2GiB", MergeKit's "5B"/"500M"/"100K", or a plain integer.

    "5B" is MergeKit's spelling of 5 billion (not 5 bytes) and means what it
    means to MergeKit (5e9, compared with tensor bytes). Anything else (a bare
    "G", a fraction of a byte, a non-finite number) is refused.
    """
    from mergelab.errors import InvalidInput

    hint = ("write a shard size like 5GB, 500MB or 2GiB (bytes), MergeKit's 5B / 500M "
            "(billions / millions, as mergekit-yaml reads them), or a whole number of bytes")
    if isinstance(value, bool):
        raise InvalidInput(f"cannot read shard size {value!r}; {hint}")
    if isinstance(value, int):
        size = value
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
        unit = match.group(2).lower() if match else None
        if unit is None or (unit and unit not in _BYTE_UNITS and unit not in _KMB):
            raise InvalidInput(f"cannot read shard size {value!r}; {hint}")
        number = float(match.group(1))
        scaled = number * (_BYTE_UNITS.get(unit) or _KMB.get(unit) or 1)
        if not math.isfinite(scaled) or scaled >= _MAX_SIZE:
            raise InvalidInput(f"shard size {value!r} is too large; {hint}")
        if not unit and not number.is_integer():
            raise InvalidInput(f"shard size {value!r} is not a whole number of bytes; {hint}")
        size = int(scaled)
    if size <= 0 or size >= _MAX_SIZE:
        raise InvalidInput(f"shard size {value!r} must be a positive size below 4 EB; {hint}")
    return size


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


def _write_file(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(content)
        fh.flush()
        os.fsync(fh.fileno())


# Architectures that spell a standard config key their own way (transformers' attribute_map):
# GPT-2, GPT-J, Bloom, MPT, ... keep their layer count in n_layer etc., and a config holding both
# spellings is ambiguous, so the architecture's own key is the one updated.
CONFIG_SYNONYMS = {"num_hidden_layers": ("n_layer", "num_layers", "n_layers"),
                   "vocab_size": ("n_vocab", "padded_vocab_size")}


def _spellings(config: Mapping[str, Any], key: str) -> list[str]:
    """The keys of `config` that stand for `key`: itself and its synonyms, those present."""
    return [k for k in (key, *CONFIG_SYNONYMS.get(key, ())) if k in config]


def _updated_config(config: dict[str, Any], updates: Mapping[str, Any]) -> dict[str, Any]:
    config = dict(config)
    for key, value in updates.items():
        text = config.get("text_config")
        if not _spellings(config, key) and isinstance(text, dict) and _spellings(text, key):
            # a multimodal config whose language model keeps the key in text_config
            config["text_config"] = {**text, **{k: value for k in _spellings(text, key)}}
            continue
        for k in _spellings(config, key) or [key]:
            config[k] = value
        # transformers 5 writes "dtype" where older versions wrote "torch_dtype":
        # when the file has the other spelling too, update it so the two agree.
        alias = {"torch_dtype": "dtype", "dtype": "torch_dtype"}.get(key)
        if alias in config:
            config[alias] = value
    return config


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


def _copy_file(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    with open(dst, "rb") as fh:
        os.fsync(fh.fileno())


def copy_assets(src: Path, dst: Path, config_updates: Mapping[str, Any], *, tokenizer: bool = True) -> list[str]:
    """Copy config, tokenizer and sentence-transformers files from `src` to `dst`.

    Weight files are never copied; the ones found in module folders are returned.
    """
    if not src.is_dir():
        raise CheckpointError(f"assets folder {src} is not a folder; give the model folder to copy "
                              "config and tokenizer files from")
    for fname in ASSET_FILES:
        if not tokenizer and fname in TOKENIZER_FILES:
            continue
        if asset_file(src, fname) is None:  # checked: no link out of src, no pipe
            continue
        if fname == "config.json":
            config = read_json_file(src / fname, "config", expect=dict, advice="fix it")
            text = json.dumps(_updated_config(config, config_updates), indent=2) + "\n"
            _write_file(dst / fname, text.encode("utf-8"))
        else:
            _copy_file(src / fname, dst / fname)
    skipped = []
    for rel in module_files(src):  # checked: no links out of src, no pipes
        if rel.lower().endswith(WEIGHT_SUFFIXES):
            skipped.append(rel)
        else:
            _copy_file(src / rel, dst / rel)
    return skipped
