"""Lazy, read-only access to the tensors of a checkpoint on local disk.

`Checkpoint(path)` opens a Hugging Face model folder, a .safetensors file or a
pickled torch state dict, checks every file it will need (headers, shards named
by an index) and then reads each tensor only when asked for it. Safetensors
tensors are read with one positioned read into a freshly allocated tensor, so
reading a model costs the memory of the tensor being read and nothing more.
Pickled files are loaded with ``weights_only=True`` only.

What is refused, always with one CheckpointError naming the file (and tensor)
and what to do: damaged safetensors files (see safetensors_format.read_header:
holes, overlaps, tensors past the end, bad JSON), JSON files (config, index,
modules.json) that are not UTF-8, not the expected type or nested absurdly deep
(mergelab.jsonfile), index files naming shards outside the model folder or a
tensor stored in two shards, LoRA/PEFT adapters (is_peft_adapter), files that
are pipes or devices, and files that change after they were opened
(Checkpoint.check_unchanged).
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

from mergelab.checkpoint.assets import asset_file, inside, module_files, module_folders, name_problem
from mergelab.checkpoint.layers import layer_index, with_layer_index
from mergelab.checkpoint.peft import LORA_TENSOR, adapter_error, adapter_weight_file, is_peft_adapter
from mergelab.checkpoint.safetensors_file import SafetensorsFile
from mergelab.checkpoint.safetensors_format import DTYPE_CODES, DTYPES
from mergelab.checkpoint.torch_file import TorchFile
from mergelab.checkpoint.units import parse_dtype
from mergelab.errors import CheckpointError
from mergelab.jsonfile import has_control_characters, no_duplicate_keys, read_json_file, shown

__all__ = ["Checkpoint", "DTYPES", "DTYPE_CODES", "asset_file", "is_peft_adapter", "layer_index", "module_files",
           "module_folders", "parse_dtype", "with_layer_index"]

ACCEPTED = ("a Hugging Face model folder (config.json with model.safetensors, model.safetensors.index.json "
            "and its shards, pytorch_model.bin, or pytorch_model.bin.index.json and its shards), a folder "
            "holding exactly one .safetensors file, a .safetensors file, or a .bin/.pt/.pth state dict")

# Names of the input embedding, tried in this order when lm_head.weight is tied to it.
EMBEDDING_NAMES = ("model.embed_tokens.weight", "transformer.wte.weight", "embed_tokens.weight",
                   "embeddings.word_embeddings.weight", "gpt_neox.embed_in.weight",
                   "model.language_model.embed_tokens.weight", "model.decoder.embed_tokens.weight",
                   "transformer.word_embeddings.weight", "word_embeddings.weight", "wte.weight")

_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class _Source(Protocol):
    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor: ...
    def view(self, name: str) -> torch.Tensor: ...
    def advise(self, name: str, advice: int, rows: tuple[int, int] | None = None) -> bool: ...
    def check_unchanged(self) -> None: ...
    def close(self) -> None: ...


def _open_file(path: Path) -> SafetensorsFile | TorchFile:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return SafetensorsFile(path)
    if suffix in (".bin", ".pt", ".pth"):
        return TorchFile(path)
    raise CheckpointError(f"{path}: unsupported file type {suffix or '(none)'}; mergelab reads {ACCEPTED}")


def _names_in(source: SafetensorsFile | TorchFile) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    if isinstance(source, SafetensorsFile):
        return {n: (e.shape, e.dtype) for n, e in source.entries.items()}
    return {n: (tuple(t.shape), t.dtype) for n, t in source.tensors.items()}


def _read_weight_map(index: Path) -> dict[str, str]:
    data = read_json_file(index, "index", expect=dict, object_pairs_hook=no_duplicate_keys)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: has no \"weight_map\" of tensor name -> shard file; "
                              "the index is corrupt, re-download or re-save the model")
    first_of: dict[str, str] = {}  # shard -> first tensor naming it: each shard name is checked once
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CheckpointError(f"{index}: weight_map maps tensor {shown(name)} to {shown(shard, 60)}, not to a "
                                  "shard file name; the index is corrupt, re-download or re-save the model")
        if has_control_characters(name):
            raise CheckpointError(f"{index}: tensor name '{shown(name)}' holds control characters (a newline, "
                                  "NUL, ...); the index is corrupt, re-download or re-save the model")
        first_of.setdefault(shard, name)
    for shard, name in first_of.items():
        problem = name_problem(shard)
        if problem:
            raise CheckpointError(f"{index}: shard file name '{shown(shard)}' of tensor {shown(name)} {problem}; an "
                                  "index may only name files inside its own folder - the index is corrupt or "
                                  "was crafted, do not use this model")
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
    ``ck[name]``, each into a new CPU tensor in its stored dtype.
    Each file's size, modification time and inode are recorded at opening;
    reads and check_unchanged() refuse a file that changed since.

    Attributes:
        path: the path as given.
        folder: the model folder (for config and tokenizer files), None for a lone file.
        config: the parsed config.json, or None.
        skipped: entries of pickled files that are not tensors, and tensors that
            a shard holds but its index does not list; they are never read.

    `adapter=True` is the adapter merge's opt-in (mergelab.lora): `path` must be a PEFT adapter
    folder, whose adapter_model.safetensors/.bin is mapped, LoRA factors and all. Without it an
    adapter is refused (adapter_error): merged as a model, it would give a wrong model.
    """

    def __init__(self, path: str | Path, *, adapter: bool = False):
        self.path = Path(path)
        self.folder: Path | None = None
        self.config: dict[str, Any] | None = None
        self.skipped: list[str] = []
        self._sources: list[_Source] = []
        self._where: dict[str, tuple[tuple[int, ...], torch.dtype, _Source]] = {}
        self._closed = False
        text = str(path)
        if not text.strip() or "\0" in text:
            what = "an empty path (an unset variable?)" if not text.strip() else f"{text[:200]!r} (it holds a NUL)"
            raise CheckpointError(f"{what} is not a checkpoint path; expected {ACCEPTED}")
        try:
            self._open(self.path.expanduser(), adapter)
        except OSError as exc:  # a name too long, a folder we may not list, an I/O error
            self.close()
            raise CheckpointError(f"{text[:300]}: cannot be read ({exc.strerror or exc}"
                                  f"{f': {str(exc.filename)[:300]}' if exc.filename else ''}); check the path and "
                                  "its permissions") from None

    # -- opening -----------------------------------------------------------------
    def _open(self, real: Path, adapter: bool) -> None:
        if not real.exists():
            if real.is_symlink():
                raise CheckpointError(f"{self.path} is a symbolic link to {os.readlink(real)}, which does not "
                                      "exist (or a loop of links); point it at the model")
            if _HF_ID.match(str(self.path)):
                raise CheckpointError(
                    f"{self.path} does not exist here; if it is a Hugging Face model id: only local paths are "
                    f"supported and nothing is downloaded (fetch it first, e.g. `hf download {self.path} "
                    "--local-dir DIR`, and pass DIR)")
            raise CheckpointError(f"{self.path} does not exist; expected {ACCEPTED}")
        if adapter:
            self.folder = real
            self._add(_open_file(adapter_weight_file(real)))
            return
        if is_peft_adapter(real):
            evidence = "it holds adapter_config.json" if real.is_dir() else f"its name is {real.name}"
            raise adapter_error(real, evidence)
        if real.is_dir():
            self._open_folder(real)
        else:
            self._add(_open_file(real))
        lora = next((n for n in self._where if LORA_TENSOR.search(n)), None)
        if lora is not None:
            self.close()
            raise adapter_error(real, f"it stores LoRA factors, e.g. tensor {shown(lora)}")

    def _open_folder(self, folder: Path) -> None:
        self.folder = folder
        if (folder / "config.json").is_file():
            self.config = read_json_file(folder / "config.json", "config", expect=dict)
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

    def _add(self, source: SafetensorsFile | TorchFile) -> None:
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
                                  f"{', '.join(shown(m) for m in missing[:5])}{' ...' if len(missing) > 5 else ''}; "
                                  "the download is incomplete, fetch them again")
        outside = next((s for s in shard_names if not inside(index.parent / s, index.parent)), None)
        if outside is not None:
            raise CheckpointError(f"{index}: shard {shown(outside)} leads outside the model folder (to "
                                  f"{(index.parent / outside).resolve()}); an index may only name files inside "
                                  "its own folder - copy the shard into the folder if it belongs to this model")
        shards: dict[str, SafetensorsFile | TorchFile] = {}
        try:
            for s in shard_names:
                shards[s] = _open_file(index.parent / s)
        finally:
            self._sources += shards.values()
        stored = {s: _names_in(src) for s, src in shards.items()}
        absent = [n for n, s in weight_map.items() if n not in stored[s]]
        if absent:
            raise CheckpointError(f"{index}: lists {len(absent)} tensor(s) absent from their shard, first "
                                  f"{shown(absent[0])} in {shown(weight_map[absent[0]])}; the index does not match "
                                  "the shards")
        for shard, names in stored.items():
            twice = next((n for n in names if n in weight_map and weight_map[n] != shard), None)
            if twice is not None:
                raise CheckpointError(f"{index}: tensor {shown(twice)} is stored in two shards, "
                                      f"{shown(weight_map[twice])} (as the index says) and {shown(shard)}; which "
                                      "copy is right is unknown - "
                                      "re-download or re-save the model")
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

    def view(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """`name` (or its rows start:stop) without reading it: a view of the file's memory map.

        Costs no memory until the pages are touched, and then only page cache.
        The mapping is private: writing to the view can never change the file
        (mergelab never writes to its inputs anyway). Pickled files that cannot
        be memory-mapped give their loaded tensor.

        The file is checked (one fstat) before the view is made. If it is then
        truncated while the view is still to be read, touching the lost pages
        kills the process with SIGBUS, which no Python code can catch; calling
        check_unchanged() after prefetching and again after using the view
        narrows that window and catches in-place changes (see SafetensorsFile).
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

    def check_unchanged(self, names: Iterable[str] | None = None) -> None:
        """Raise CheckpointError if a file holding one of `names` (default: every file) changed since opening.

        "Changed" means: another size, modification time, inode or device, or
        the path gone. Call it before touching a job's tensors through view()
        (a truncated file would kill the process with SIGBUS there; see
        SafetensorsFile) and after prefetching them. One stat per file.
        Raises KeyError for a name this checkpoint does not store.
        """
        self._check_open()
        sources = self._sources if names is None else {id(s): s for s in (self._entry(n)[2] for n in names)}.values()
        for source in sources:
            source.check_unchanged()

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
        if value is not None:
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                return value
            raise CheckpointError(f"{self.folder / 'config.json' if self.folder else self.path}: its layer count "
                                  f"is {str(value)[:40]!r}, not a non-negative integer; fix config.json")
        seen = [i for i in map(layer_index, self._where) if i is not None]
        return 1 + max(seen) if seen else 0

    def _embedding_name(self) -> str | None:
        return next((n for n in EMBEDDING_NAMES if n in self._where), None)

    @property
    def tied_embeddings(self) -> bool:
        """Whether lm_head shares the input embedding: config's tie_word_embeddings, else inferred."""
        value = self._config_value("tie_word_embeddings")
        if isinstance(value, bool):
            return value
        if value is not None:  # "false" is a true string: guessing would make lm_head wrong either way
            raise CheckpointError(f"{self.folder / 'config.json' if self.folder else self.path}: "
                                  f"tie_word_embeddings is {str(value)[:40]!r}, not true or false; fix config.json")
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
