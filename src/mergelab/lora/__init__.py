"""LoRA adapter algebra: merge adapters exactly, apply them (model+lora), extract them.

Importing this package is cheap; the functions load their modules on first use.

    mergelab.lora.merge_adapters(["./lora-a", "./lora-b"], "out", method="ties", rank=16, weight=[0.6, 0.4])
    mergelab.lora.extract("./finetuned", "./base", "out", rank=16)
"""

from __future__ import annotations

from mergelab.lora.peft_format import is_peft_adapter

_LAZY = {
    "merge_adapters": "mergelab.lora.api", "extract": "mergelab.lora.extract",
    "merge_lora_layers": "mergelab.lora.merge", "read_adapter": "mergelab.lora.peft_format",
    "write_adapter": "mergelab.lora.peft_format", "extract_layers": "mergelab.lora.extract",
    "scan_adapter": "mergelab.lora.peft_format", "merge_adapter_files": "mergelab.lora.adapter_run",
    "AppliedLoraCheckpoint": "mergelab.lora.applied", "split_lora_reference": "mergelab.recipe.references",
}

__all__ = ["is_peft_adapter", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mergelab.lora' has no attribute {name!r}")
