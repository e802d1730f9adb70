"""The files beside a model's weights (config, tokenizer, sentence-transformers modules): found, checked, copied.

Files next to the weights are copied into merged models, so each is checked
first: a symbolic link leading outside the model folder, or anything that is
not a regular file, is refused with CheckpointError naming it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from mergelab.errors import CheckpointError
from mergelab.jsonfile import read_json_file, shown

__all__ = ["ASSET_FILES", "TOKENIZER_FILES", "WEIGHT_SUFFIXES", "asset_file", "copy_assets", "copy_file", "inside",
           "module_files", "module_folders", "name_problem", "updated_config", "write_file"]


def name_problem(name: str) -> str | None:
    """Why `name`, a shard file named by an index, cannot be a file inside the model folder; None if it can."""
    if not name.strip():
        return "is empty"
    if "\0" in name:
        return "contains a NUL character"
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        return "is an absolute path"
    if ".." in PurePosixPath(name).parts or ".." in PureWindowsPath(name).parts:
        return "climbs out of the folder with '..'"
    return None


def inside(path: Path, folder: Path) -> bool:
    """Whether `path`, symbolic links resolved, lies inside `folder` (resolved).

    A Hugging Face cache snapshot (HUB/models--org--name/snapshots/REV) holds
    links into the cache's blobs folder (HUB/models--org--name/blobs); those
    count as inside.
    """
    real, root = path.resolve(), folder.resolve()
    if real.is_relative_to(root):
        return True
    return root.parent.name == "snapshots" and real.is_relative_to(root.parent.parent / "blobs")


def asset_file(src: str | Path, rel: str) -> Path | None:
    """The file `rel` (e.g. "tokenizer.json") of model folder `src`, checked before it is copied; None if absent.

    Files next to the weights are copied into merged models, so one that is a
    symbolic link leading outside `src` (say tokenizer.json -> ~/.ssh/id_rsa in
    a cloned repository) would leak into an upload: refused with CheckpointError,
    as is anything that is not a regular file (a pipe would block the copy).
    Links into a Hugging Face cache's blobs folder count as inside (see inside).
    """
    path = Path(src) / rel
    if not path.exists() and not path.is_symlink():
        return None
    if path.is_symlink() and not inside(path, Path(src)):
        raise CheckpointError(f"{path}: a symbolic link leading outside the model folder (to {path.resolve()}); "
                              "its content would be copied into the merged model - replace the link by a copy "
                              "of the file if it belongs to the model")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file (a folder, pipe, device or broken link); mergelab "
                              "copies this file into merged models - remove it or replace it by a file")
    return path


# sentence-transformers module folders: 1_Pooling, 2_Normalize, ...
_MODULE_FOLDER = re.compile(r"^\d+_\w+$")


def module_folders(src: str | Path) -> list[str]:
    """The sentence-transformers module folders of model folder `src`, checked, as relative paths.

    They are the non-empty "path"s of modules.json plus every folder named like
    1_Pooling. Folders that do not exist are left out. Raises CheckpointError
    for a modules.json that is not a list of objects with string paths, a path
    that is absolute or climbs out with '..', and a module folder that is a
    symbolic link: its files are copied into merged models, so it must be part
    of the model folder itself.
    """
    src = Path(src)
    names = {p.name for p in src.iterdir() if _MODULE_FOLDER.match(p.name) and p.is_dir()}
    modules_json = src / "modules.json"
    if modules_json.is_file() or modules_json.is_symlink():
        modules = read_json_file(modules_json, "modules.json", expect=list, advice="fix it or remove it")
        for i, module in enumerate(modules):
            path = module.get("path", "") if isinstance(module, dict) else None
            if not isinstance(path, str):
                raise CheckpointError(f"{modules_json}: entry {i} is not an object with a string \"path\"; "
                                      "fix it or remove it")
            path = path.strip().rstrip("/")
            if not path or path == ".":
                continue  # the model folder itself (the Transformer module)
            problem = name_problem(path)
            if problem:
                raise CheckpointError(f"{modules_json}: module path '{shown(path)}' {problem}; module folders "
                                      "must lie inside the model folder - fix modules.json")
            names.add(path)
    found = []
    for name in sorted(names):
        folder = src / name
        if any((src / PurePosixPath(*PurePosixPath(name).parts[:i + 1])).is_symlink()
               for i in range(len(PurePosixPath(name).parts))):
            raise CheckpointError(f"{folder}: this sentence-transformers module folder is a symbolic link "
                                  f"(to {folder.resolve()}); its files would be copied into the merged model, "
                                  "so mergelab only takes real folders - replace the link by a copy")
        if folder.is_dir():
            found.append(name)
    return found


def module_files(src: str | Path) -> list[str]:
    """Every file in the module folders (see module_folders) of `src`, as paths relative to `src`, checked.

    A file that is a symbolic link must resolve inside `src` (or, for a Hugging
    Face cache snapshot, into its blobs folder); links to folders, and entries
    that are not regular files (pipes, devices), are refused with CheckpointError.
    Links are not followed into folders.
    """
    src = Path(src)
    out = []
    for name in module_folders(src):
        for root, dirs, files in os.walk(src / name, followlinks=False):
            for entry in sorted(dirs):
                if (Path(root) / entry).is_symlink():
                    raise CheckpointError(f"{Path(root) / entry}: a symbolic link to a folder inside a "
                                          "sentence-transformers module folder; mergelab does not copy linked "
                                          "folders - replace it by a copy")
            dirs.sort()
            for entry in sorted(files):
                rel = (Path(root) / entry).relative_to(src).as_posix()
                asset_file(src, rel)
                out.append(rel)
    return out


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


def write_file(path: Path, content: bytes) -> None:
    """Write `content` to `path` (its folder made if missing) and fsync it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(content)
        fh.flush()
        os.fsync(fh.fileno())


def copy_file(src: Path, dst: Path) -> None:
    """Copy `src` to `dst` (its folder made if missing) and fsync the copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    with open(dst, "rb") as fh:
        os.fsync(fh.fileno())


# Architectures that spell a standard config key their own way (transformers' attribute_map):
# GPT-2, GPT-J, Bloom, MPT, ... keep their layer count in n_layer etc., and a config holding both
# spellings is ambiguous, so the architecture's own key is the one updated.
CONFIG_SYNONYMS = {"num_hidden_layers": ("n_layer", "num_layers", "n_layers"),
                   "vocab_size": ("n_vocab", "padded_vocab_size")}


def _spellings(config: Mapping[str, Any], key: str) -> list[str]:
    """The keys of `config` that stand for `key`: itself and its synonyms, those present."""
    return [k for k in (key, *CONFIG_SYNONYMS.get(key, ())) if k in config]


def updated_config(config: dict[str, Any], updates: Mapping[str, Any]) -> dict[str, Any]:
    """`config` with `updates` set under the key each architecture spells them with (CONFIG_SYNONYMS)."""
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
            text = json.dumps(updated_config(config, config_updates), indent=2) + "\n"
            write_file(dst / fname, text.encode("utf-8"))
        else:
            copy_file(src / fname, dst / fname)
    skipped = []
    for rel in module_files(src):  # checked: no links out of src, no pipes
        if rel.lower().endswith(WEIGHT_SUFFIXES):
            skipped.append(rel)
        else:
            copy_file(src / rel, dst / rel)
    return skipped
