"""Lazy, read-only access to the tensors of a checkpoint on local disk.

`Checkpoint(path)` opens a Hugging Face model folder, a .safetensors file or a
pickled torch state dict, checks every file it will need (headers, shards named
by an index) and then reads each tensor only when asked for it. Safetensors
tensors are read with one positioned read into a freshly allocated tensor, so
reading a model costs the memory of the tensor being read and nothing more.
Pickled files are loaded with ``weights_only=True`` only.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

from mergelab.checkpoint.safetensors_format import DTYPE_CODES, DTYPES, SafetensorsFile
from mergelab.errors import CheckpointError

__all__ = ["Checkpoint", "DTYPES", "DTYPE_CODES", "layer_index", "with_layer_index", "parse_dtype"]

ACCEPTED = ("a Hugging Face model folder (config.json with model.safetensors, model.safetensors.index.json "
            "and its shards, pytorch_model.bin, or pytorch_model.bin.index.json and its shards), a folder "
            "holding exactly one .safetensors file, a .safetensors file, or a .bin/.pt/.pth state dict")

# Names of the input embedding, tried in this order when lm_head.weight is tied to it.
EMBEDDING_NAMES = ("model.embed_tokens.weight", "transformer.wte.weight", "embed_tokens.weight",
                   "embeddings.word_embeddings.weight", "gpt_neox.embed_in.weight",
                   "model.language_model.embed_tokens.weight", "model.decoder.embed_tokens.weight",
                   "transformer.word_embeddings.weight", "word_embeddings.weight", "wte.weight")

_LAYER_WORDS = frozenset({"layers", "h", "blocks", "block", "layer"})
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPE_NAMES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}


def parse_dtype(text: str | torch.dtype) -> torch.dtype:
    """The torch dtype named by `text` ("bfloat16", "bf16", "float16", "fp16", "half", "float32", ...).

    Raises ValueError (so pydantic validators report it as a field error).
    """
    if isinstance(text, torch.dtype):
        return text
    key = str(text).strip().lower().removeprefix("torch.")
    if key not in _DTYPE_NAMES:
        raise ValueError(f"unknown dtype {text!r}; use one of bfloat16 (bf16), float16 (fp16, half), "
                         "float32 (fp32, float), float64")
    return _DTYPE_NAMES[key]


def _layer_position(parts: list[str]) -> int | None:
    for i in range(len(parts) - 1):
        if parts[i] in _LAYER_WORDS and parts[i + 1].isascii() and parts[i + 1].isdigit():
            return i + 1
    return None


def layer_index(name: str) -> int | None:
    """The transformer block index in a tensor name, or None.

    It is the integer component right after a component named layers, h,
    blocks, block or layer; whole dotted components only, so "layers.1" never
    matches "layers.10". model.layers.12.mlp.up_proj.weight -> 12.
    """
    parts = name.split(".")
    pos = _layer_position(parts)
    return None if pos is None else int(parts[pos])


def with_layer_index(name: str, new_index: int) -> str:
    """`name` with its block index (see layer_index) replaced by `new_index`."""
    parts = name.split(".")
    pos = _layer_position(parts)
    if pos is None:
        raise ValueError(f"tensor {name} has no layer index to replace")
    parts[pos] = str(new_index)
    return ".".join(parts)


class _Source(Protocol):
    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor: ...
    def read_rows(self, name: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor: ...
    def view(self, name: str) -> torch.Tensor: ...
    def advise(self, name: str, advice: int, rows: tuple[int, int] | None = None) -> bool: ...
    def close(self) -> None: ...


def _fresh_copy(t: torch.Tensor) -> torch.Tensor:
    # A new contiguous tensor: callers may modify it, and it must not keep a
    # view of the loaded (possibly memory-mapped, possibly shared) storage.
    return torch.empty(t.shape, dtype=t.dtype).copy_(t)


def _torch_load(path: Path, mmap: bool) -> Any:
    """torch.load with weights_only=True; None when this old-format file cannot be memory-mapped."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" in str(exc).lower():
            raise CheckpointError(
                f"{path}: loading it needs unsafe unpickling (it stores Python objects other than "
                "tensors), which mergelab refuses; convert it to safetensors with a script you trust") from None
        raise CheckpointError(f"{path}: not a readable torch file ({exc}); it looks truncated or corrupt") from exc
    except RuntimeError as exc:
        if mmap and "mmap" in str(exc):
            return None
        raise CheckpointError(f"{path}: not a readable torch file ({str(exc)[:200]}); "
                              "it looks truncated or corrupt") from exc
    except Exception as exc:  # EOFError, zipfile and struct errors: all mean a damaged file
        raise CheckpointError(f"{path}: not a readable torch file ({type(exc).__name__}: {exc}); "
                              "it looks truncated or corrupt") from exc


class _TorchFile:
    """A pickled state dict, memory-mapped where the file format allows it."""

    def __init__(self, path: Path):
        self.path = path
        obj = _torch_load(path, mmap=True)
        if obj is None:  # pre-1.6 torch.save format: no zip container to map
            obj = _torch_load(path, mmap=False)
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict (name -> tensor)")
        self.skipped: list[str] = []
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), Mapping):
                self.skipped += [str(k) for k in obj if k != wrapper]
                obj = obj[wrapper]
                break
        self.tensors: dict[str, torch.Tensor] = {}
        for key, value in obj.items():
            if isinstance(value, torch.Tensor):
                self.tensors[str(key)] = value
            else:
                self.skipped.append(str(key))

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        return _fresh_copy(self.tensors[name]) if out is None else out.copy_(self.tensors[name])

    def read_rows(self, name: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        rows = self.tensors[name][start:stop]
        return _fresh_copy(rows) if out is None else out.copy_(rows)

    def view(self, name: str) -> torch.Tensor:
        return self.tensors[name]  # memory-mapped (privately) where the file format allows it

    def advise(self, name: str, advice: int, rows: tuple[int, int] | None = None) -> bool:
        return True  # loaded by torch: nothing to advise

    def close(self) -> None:
        self.tensors = {}


def _open_file(path: Path) -> SafetensorsFile | _TorchFile:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return SafetensorsFile(path)
    if suffix in (".bin", ".pt", ".pth"):
        return _TorchFile(path)
    raise CheckpointError(f"{path}: unsupported file type {suffix or '(none)'}; mergelab reads {ACCEPTED}")


def _names_in(source: SafetensorsFile | _TorchFile) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    if isinstance(source, SafetensorsFile):
        return {n: (e.shape, e.dtype) for n, e in source.entries.items()}
    return {n: (tuple(t.shape), t.dtype) for n, t in source.tensors.items()}


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read this {what} ({exc}); fix or re-download it") from exc


def _read_weight_map(index: Path) -> dict[str, str]:
    data = _read_json(index, "index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{index}: has no \"weight_map\" of tensor name -> shard file; "
                              "the index is corrupt, re-download or re-save the model")
    return weight_map


def _human_bytes(n: int) -> str:
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


class Checkpoint(Mapping[str, torch.Tensor]):
    """Read-only mapping tensor name -> tensor over a checkpoint on local disk, read on demand.

    Every file is opened and checked when the Checkpoint is made, so a damaged
    or incomplete model fails before any merge work; tensors are read only by
    ``ck[name]`` or ``ck.read_rows``, each into a new CPU tensor in its stored dtype.

    Attributes:
        path: the path as given.
        folder: the model folder (for config and tokenizer files), None for a lone file.
        config: the parsed config.json, or None.
        skipped: entries of pickled files that are not tensors, and tensors that
            a shard holds but its index does not list; they are never read.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.folder: Path | None = None
        self.config: dict[str, Any] | None = None
        self.skipped: list[str] = []
        self._sources: list[_Source] = []
        self._where: dict[str, tuple[tuple[int, ...], torch.dtype, _Source]] = {}
        self._closed = False
        real = self.path.expanduser()
        if not real.exists():
            if _HF_ID.match(str(path)):
                raise CheckpointError(
                    f"{path} does not exist here; if it is a Hugging Face model id: only local paths are "
                    f"supported and nothing is downloaded (fetch it first, e.g. `hf download {path} "
                    "--local-dir DIR`, and pass DIR)")
            raise CheckpointError(f"{path} does not exist; expected {ACCEPTED}")
        if real.is_dir():
            self._open_folder(real)
        else:
            self._add(_open_file(real))

    # -- opening -----------------------------------------------------------------
    def _open_folder(self, folder: Path) -> None:
        self.folder = folder
        if (folder / "config.json").is_file():
            config = _read_json(folder / "config.json", "config")
            if not isinstance(config, dict):
                raise CheckpointError(f"{folder / 'config.json'}: is not a JSON object; fix or re-download it")
            self.config = config
        # The order transformers uses: safetensors before pickles, one file before an index.
        for name in ("model.safetensors", "model.safetensors.index.json",
                     "pytorch_model.bin", "pytorch_model.bin.index.json"):
            if (folder / name).is_file():
                if name.endswith(".index.json"):
                    self._open_index(folder / name)
                else:
                    self._add(_open_file(folder / name))
                return
        lone = sorted(folder.glob("*.safetensors"))
        if len(lone) == 1:
            self._add(_open_file(lone[0]))
            return
        found = (f"found {len(lone)} .safetensors files and no model.safetensors.index.json" if lone
                 else "found no weight file")
        raise CheckpointError(f"{folder}: {found}; mergelab reads {ACCEPTED}")

    def _add(self, source: SafetensorsFile | _TorchFile) -> None:
        self._sources.append(source)
        self.skipped += getattr(source, "skipped", [])
        for name, (shape, dtype) in _names_in(source).items():
            self._where[name] = (shape, dtype, source)

    def _open_index(self, index: Path) -> None:
        weight_map = _read_weight_map(index)
        shard_names = list(dict.fromkeys(weight_map.values()))
        missing = [s for s in shard_names if not (index.parent / s).is_file()]
        if missing:
            raise CheckpointError(f"{index}: names shard file(s) missing from {index.parent}: "
                                  f"{', '.join(missing)}; the download is incomplete, fetch them again")
        shards = {s: _open_file(index.parent / s) for s in shard_names}
        self._sources += shards.values()
        stored = {s: _names_in(src) for s, src in shards.items()}
        absent = [n for n, s in weight_map.items() if n not in stored[s]]
        if absent:
            raise CheckpointError(f"{index}: lists {len(absent)} tensor(s) absent from their shard, first "
                                  f"{absent[0]} in {weight_map[absent[0]]}; the index does not match the shards")
        for name, shard in weight_map.items():
            shape, dtype = stored[shard][name]
            self._where[name] = (shape, dtype, shards[shard])
        for shard, src in shards.items():
            self.skipped += getattr(src, "skipped", [])
            self.skipped += [n for n in stored[shard] if weight_map.get(n) != shard]

    # -- Mapping -----------------------------------------------------------------
    def _entry(self, name: str) -> tuple[tuple[int, ...], torch.dtype, _Source]:
        try:
            return self._where[name]
        except KeyError:
            raise KeyError(name) from None

    def __getitem__(self, name: str) -> torch.Tensor:
        source = self._entry(name)[2]
        self._check_open()
        return source.read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, name: object) -> bool:
        # Mapping's default would read the tensor to answer.
        return name in self._where

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r})"

    # -- metadata ------------------------------------------------------------------
    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[0]

    def dtype(self, name: str) -> torch.dtype:
        return self._entry(name)[1]

    def nbytes(self, name: str) -> int:
        shape, dtype, _ = self._entry(name)
        return math.prod(shape) * dtype.itemsize

    @property
    def total_bytes(self) -> int:
        return sum(math.prod(shape) * dtype.itemsize for shape, dtype, _ in self._where.values())

    def read_rows(self, name: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows start:stop of dim 0 of `name`, reading only those bytes (for safetensors).

        With `out` (contiguous, of the rows' shape and the tensor's dtype) the
        bytes go straight into it: no new tensor, no copy.
        """
        shape, dtype, source = self._entry(name)
        if not shape:
            raise ValueError(f"tensor {name} of {self.path} is a scalar; it has no rows to read")
        if not 0 <= start <= stop <= shape[0]:
            raise ValueError(f"rows {start}:{stop} are outside tensor {name} of {self.path} ({shape[0]} rows)")
        if out is not None:
            self._check_out(name, out, (stop - start, *shape[1:]), dtype)
        self._check_open()
        return source.read_rows(name, start, stop, out)

    def view(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """`name` (or its rows start:stop) without reading it: a view of the file's memory map.

        Costs no memory until the pages are touched, and then only page cache.
        The mapping is private: writing to the view can never change the file
        (mergelab never writes to its inputs anyway). Pickled files that cannot
        be memory-mapped give their loaded tensor.
        """
        shape, _, source = self._entry(name)
        self._check_open()
        t = source.view(name)
        if rows is not None:
            if not shape or not 0 <= rows[0] <= rows[1] <= shape[0]:
                raise ValueError(f"rows {rows[0]}:{rows[1]} are outside tensor {name} of {self.path} {shape}")
            t = t[rows[0]:rows[1]]
        return t

    def advise(self, name: str, advice: int, rows: tuple[int, int] | None = None) -> bool:
        """Pass an madvise() hint (mmap.MADV_WILLNEED, MADV_DONTNEED, ...) for the pages of `name`.

        Returns False when the system refused it (e.g. an advice this kernel does not know).
        """
        self._check_open()
        return self._entry(name)[2].advise(name, advice, rows)

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Read the whole tensor `name` into `out` (contiguous, same shape and dtype); returns out."""
        shape, dtype, source = self._entry(name)
        self._check_out(name, out, shape, dtype)
        self._check_open()
        return source.read(name, out)

    def _check_out(self, name: str, out: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        if tuple(out.shape) != tuple(shape) or out.dtype != dtype or not out.is_contiguous() \
                or out.device.type != "cpu":
            raise ValueError(f"cannot read tensor {name} of {self.path} ({tuple(shape)}, {dtype}) into a "
                             f"{'contiguous' if out.is_contiguous() else 'non-contiguous'} {out.device.type} "
                             f"tensor of shape {tuple(out.shape)} and dtype {out.dtype}")

    def _config_value(self, *keys: str) -> Any:
        for config in (self.config or {}, (self.config or {}).get("text_config") or {}):
            for key in keys:
                if isinstance(config, dict) and config.get(key) is not None:
                    return config[key]
        return None

    @property
    def num_layers(self) -> int:
        """Config's num_hidden_layers / n_layer / num_layers, else 1 + the largest block index seen, else 0."""
        value = self._config_value("num_hidden_layers", "n_layer", "num_layers")
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        seen = [i for i in map(layer_index, self._where) if i is not None]
        return 1 + max(seen) if seen else 0

    def _embedding_name(self) -> str | None:
        return next((n for n in EMBEDDING_NAMES if n in self._where), None)

    @property
    def tied_embeddings(self) -> bool:
        """Whether lm_head shares the input embedding: config's tie_word_embeddings, else inferred."""
        value = self._config_value("tie_word_embeddings")
        if value is not None:
            return bool(value)
        return "lm_head.weight" not in self._where and self._embedding_name() is not None

    def alias_for(self, name: str) -> str | None:
        """The stored tensor that stands for absent `name`: the input embedding for a tied lm_head."""
        if name == "lm_head.weight" and name not in self._where and self.tied_embeddings:
            return self._embedding_name()
        return None

    def describe(self) -> str:
        """One line: path, tensor count, bytes and dtypes."""
        counts = Counter(str(dtype).removeprefix("torch.") for _, dtype, _ in self._where.values())
        dtypes = ", ".join(f"{dt} x{n}" for dt, n in counts.most_common())
        return f"{self.path}: {len(self)} tensors, {_human_bytes(self.total_bytes)} ({dtypes or 'no tensors'})"

    # -- lifetime ------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError(f"{self.path}: this Checkpoint was closed; open it again to read tensors")

    def close(self) -> None:
        """Close file handles and drop memory maps; metadata stays available."""
        self._closed = True
        for source in self._sources:
            source.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing useful left to do
            pass
