"""Models named by Hugging Face Hub id (`org/name`, `org/name@revision`), as MergeKit recipes write them.

A recipe's model reference that is not a local path but looks like a Hub id is
found, in this order:

1. in the local Hugging Face cache (no network): `$HF_HUB_CACHE`, else
   `$HF_HOME/hub`, else `~/.cache/huggingface/hub`, laid out as
   `models--org--name/snapshots/<commit>/...` with `refs/<branch>` naming the
   commit of a branch;
2. by downloading only what a merge reads (`MODEL_FILE_PATTERNS` plus the
   weights in one format: safetensors when the repository has them, else
   PyTorch .bin) into that cache, unless offline (`offline=True`, mergelab's
   `--offline`, or `HF_HUB_OFFLINE=1`).

Gated models need a token: huggingface_hub reads `HF_TOKEN` (or the one saved
by `hf auth login`). A local path that exists always wins over a Hub id, as in
MergeKit. huggingface_hub is imported only when a Hub id is resolved.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from mergelab.errors import CheckpointError

__all__ = ["HubRef", "parse_hub_reference", "hub_cache_dir", "offline_from_env", "resolve_hub_model",
           "MODEL_FILE_PATTERNS", "weight_patterns"]

# Everything a merged model folder needs besides the weights: config, generation config, tokenizer
# files (fast and slow), chat templates, PEFT adapter configs, sentence-transformers module files.
MODEL_FILE_PATTERNS = [
    "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "vocab.txt", "merges.txt",
    "chat_template.jinja", "chat_template.json",
    "adapter_config.json",
    "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
    "[0-9]*_*/*",  # sentence-transformers modules: 1_Pooling/config.json, 2_Dense/..., 3_Normalize/
]
_SAFETENSORS = ["*.safetensors", "*.safetensors.index.json"]
_PYTORCH_BIN = ["pytorch_model*.bin", "adapter_model.bin", "*.bin.index.json"]

# A repository id as the Hub spells it: one owner, one name, letters, digits and -_. only.
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


class HubRef:
    """A parsed Hub reference: repository id and revision (None: the default branch, main)."""

    def __init__(self, repo_id: str, revision: str | None):
        self.repo_id = repo_id
        self.revision = revision

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")

    def __repr__(self) -> str:
        return f"HubRef({self.repo_id!r}, {self.revision!r})"


def parse_hub_reference(ref: str) -> HubRef | None:
    """`org/name` or `org/name@revision` -> HubRef; None for anything else (paths, model+lora)."""
    text = ref.strip()
    if text.startswith((".", "/", "~")) or "\\" in text:
        return None
    repo, _, revision = text.partition("@")
    if not _REPO_ID.match(repo) or ".." in repo or repo.endswith((".yml", ".yaml", ".json")):
        return None
    if "@" in text and (not revision or "@" in revision or ".." in revision):
        return None
    return HubRef(repo, revision or None)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def offline_from_env() -> bool:
    """HF_HUB_OFFLINE, read now (huggingface_hub reads it once, at import)."""
    return _truthy(os.environ.get("HF_HUB_OFFLINE"))


def hub_cache_dir() -> Path:
    """The Hub cache folder, read from the environment now (so a changed HF_HOME is honoured)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def weight_patterns(files: list[str]) -> list[str]:
    """The weight files to fetch from a repository holding `files`: one format, safetensors first."""
    if any(f.endswith(".safetensors") for f in files):
        return list(_SAFETENSORS)
    return list(_PYTORCH_BIN)


def _has_weights(folder: Path) -> bool:
    """Weights at the top level, and every shard an index names (an interrupted download lacks some)."""
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    if not any(n.endswith((".safetensors", ".bin", ".pt", ".pth")) for n in names):
        return False
    for index in (n for n in names if n.endswith(".index.json")):
        try:
            shards = set(json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # the reader reports a broken index with its own message
        if not all(isinstance(f, str) and (folder / f).is_file() for f in shards):
            return False
    return True


def _cached_snapshot(ref: HubRef, cache: Path) -> Path | None:
    """The cached snapshot folder of `ref` holding weights, or None; never touches the network."""
    import huggingface_hub as hf

    try:
        folder = Path(hf.snapshot_download(ref.repo_id, revision=ref.revision, cache_dir=str(cache),
                                           local_files_only=True))
    except Exception:  # noqa: BLE001 - any miss (no repo, no revision, no snapshot) means "not cached"
        return None
    return folder if _has_weights(folder) else None


def _how_to_get(ref: HubRef) -> str:
    rev = f" --revision {ref.revision}" if ref.revision else ""
    return f"`hf download {ref.repo_id}{rev}` (or let mergelab download: offline=False, HF_HUB_OFFLINE unset)"


def _download(ref: HubRef, cache: Path) -> Path:
    """Fetch only what a merge reads of `ref` into `cache`; CheckpointError on any failure."""
    import huggingface_hub as hf
    from huggingface_hub import errors as hf_errors

    try:
        files = hf.list_repo_files(ref.repo_id, revision=ref.revision)
        patterns = MODEL_FILE_PATTERNS + weight_patterns(files)
        folder = Path(hf.snapshot_download(ref.repo_id, revision=ref.revision, cache_dir=str(cache),
                                           allow_patterns=patterns))
    except hf_errors.GatedRepoError:
        raise CheckpointError(f"Hub model '{ref}' is gated: accept its terms on https://huggingface.co/"
                              f"{ref.repo_id} and set HF_TOKEN (or run `hf auth login`)") from None
    except hf_errors.RevisionNotFoundError:
        raise CheckpointError(f"Hub model '{ref.repo_id}' has no revision '{ref.revision}'; check the "
                              "branch, tag or commit after '@'") from None
    except hf_errors.RepositoryNotFoundError:
        raise CheckpointError(f"'{ref}' is neither a local path nor a Hub model (or it is private: set "
                              "HF_TOKEN); check the name") from None
    except Exception as exc:  # noqa: BLE001 - network and disk errors come in many types
        first_line = (str(exc).splitlines() or [""])[0][:200]
        raise CheckpointError(f"Hub model '{ref}' is not in the local cache ({cache}) and could not be "
                              f"downloaded ({type(exc).__name__}: {first_line}); download it with "
                              f"{_how_to_get(ref)}") from None
    if not _has_weights(folder):
        raise CheckpointError(f"Hub model '{ref}' holds no safetensors or PyTorch weights at its top level "
                              f"({folder}); mergelab merges transformers-style model folders")
    return folder


def resolve_hub_model(ref: str, *, offline: bool | None = None) -> str:
    """The local folder of Hub model `ref`: from the cache, else downloaded (unless offline).

    Args:
        ref: `org/name` or `org/name@revision` (branch, tag or commit hash).
        offline: never use the network; None: as HF_HUB_OFFLINE says.

    Raises:
        CheckpointError: one line naming the model and how to get it.
    """
    hub = parse_hub_reference(ref)
    if hub is None:
        raise CheckpointError(f"'{ref}' is not a Hub model id (org/name or org/name@revision)")
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        raise CheckpointError(f"'{ref}' names a Hub model, which needs huggingface_hub: "
                              "pip install huggingface_hub (or mergelab[hf])") from None
    cache = hub_cache_dir()
    found = _cached_snapshot(hub, cache)
    if found is not None:
        return str(found)
    if offline_from_env() if offline is None else offline:
        raise CheckpointError(f"'{hub}' is no local path, and as a Hub model it is not in the local cache "
                              f"({cache}) while mergelab is offline; download it first with {_how_to_get(hub)}, "
                              "or check the path", option="offline")
    return str(_download(hub, cache))
