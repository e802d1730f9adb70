"""Evaluator setups: a template model and an evaluator, built from typed arguments.

    causal_lm_setup    mean next-token loss of a Hugging Face causal LM, built from the
                       first model's config.json, on `text` (tokenized with `tokenizer`,
                       default the first model's folder) or `tokens` (a torch file of ids);
    classifier_setup   cross-entropy and accuracy on `data` ({"X": ..., "y": ...} or
                       (X, y)) of the nn.Module that `model` (module:factory) builds;
    function_setup     a user function (module:function or path/to/file.py:function)
                       returning a dict of metrics. With `model` it is called with the
                       module, weights loaded; without, with the state dict (name -> tensor).

Errors name these keywords (and carry them as `MergeError.option`); the command line's
options are turned into these calls by `mergelab.cli.evaluators`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mergelab.analysis import evaluators as ev
from mergelab.checkpoint.reader import Checkpoint
from mergelab.checkpoint.state_file import read_data_file
from mergelab.errors import MergeError, fixed_by

# ----------------------------------------------------------------------------- files


def load_torch_file(path: Path, what: str) -> Any:
    """A torch (weights_only) or safetensors file's contents; `what` names the option in errors."""
    if not path.is_file():
        raise MergeError(f"{what} {path} does not exist")
    try:
        return read_data_file(path)
    except Exception as exc:
        raise MergeError(f"{what} {path}: cannot read it as a torch or safetensors file "
                         f"({type(exc).__name__}: {exc})") from exc


def inputs_and_labels(obj: Any, path: Path, what: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(X, y) from {"X": ..., "y": ...}, (X, y) or a lone tensor X (then y is None)."""
    if isinstance(obj, torch.Tensor):
        return obj, None
    if isinstance(obj, Mapping) and "X" in obj:
        return obj["X"], obj.get("y")
    if isinstance(obj, (list, tuple)) and len(obj) == 2 and all(isinstance(t, torch.Tensor) for t in obj):
        return obj[0], obj[1]
    found = sorted(obj) if isinstance(obj, Mapping) else type(obj).__name__
    raise MergeError(f"{what} {path}: expected {{'X': inputs, 'y': labels}} or (X, y) saved with torch.save, "
                     f"found {found}")


def token_ids(path: Path, what: str = "tokens") -> torch.Tensor:
    obj = load_torch_file(path, what)
    ids = obj.get("input_ids") if isinstance(obj, Mapping) else obj
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point():
        raise MergeError(f"{what} {path}: expected an integer tensor of token ids (or {{'input_ids': ...}})")
    return ids.reshape(-1)


def read_state(ck: Checkpoint, want: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """Every tensor of `ck`; names in `want` it lacks but stores under an alias (tied lm_head) are filled in."""
    state = {name: ck[name] for name in ck}
    for name in want:
        alias = None if name in state else ck.alias_for(name)
        if alias is not None:
            state[name] = state[alias]
    return state


# ----------------------------------------------------------------------------- evaluator setup


@dataclasses.dataclass
class Setup:
    """What the analyses need: a template module, an evaluator, batch-norm batches, a description."""

    template: nn.Module
    evaluator: ev.Evaluator
    description: str
    refresh_bn: list[torch.Tensor] | None = None


class StateDictTemplate(nn.Module):
    """Template for evaluators that take a state dict: holds the current point's tensors, no parameters."""

    def __init__(self, state: Mapping[str, torch.Tensor]):
        super().__init__()
        self.tensors = dict(state)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        return dict(self.tensors)

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False):
        self.tensors = dict(state_dict)


def _on_state_dict(fn: ev.Evaluator) -> ev.Evaluator:
    @functools.wraps(fn)  # keeps the user's name, which evaluation errors quote
    def evaluate_state_dict(model: StateDictTemplate) -> Mapping[str, float]:
        return fn(model.tensors)

    return evaluate_state_dict


def _to_device(module: nn.Module, device: str | None) -> nn.Module:
    try:
        return module.to(device or "cpu")
    except (RuntimeError, AssertionError) as exc:  # an unknown name, or torch built without that backend
        raise MergeError(f"device={device!r}: cannot move the model there ({exc}); use cpu, cuda or cuda:N",
                         option="device") from exc


def factory_module(spec: str, device: str | None) -> nn.Module:
    """The nn.Module that `spec` (module:factory or file.py:factory, called with no arguments) builds."""
    try:
        factory = ev.load_evaluator(spec)  # the same module:function import, reported as the model
    except MergeError as exc:
        raise MergeError(str(exc).replace(f"evaluator {spec!r}", f"model {spec!r}", 1), option="model") from exc
    try:
        module = factory()
    except Exception as exc:
        raise MergeError(f"model {spec!r}: calling it failed ({type(exc).__name__}: {exc}); it must build "
                         "the model with no arguments", option="model") from exc
    if not isinstance(module, nn.Module):
        raise MergeError(f"model {spec!r} returned {type(module).__name__}, not a torch nn.Module", option="model")
    return _to_device(module, device)


def _hf_causal_lm(folder: Path, device: str | None) -> nn.Module:
    if not (folder / "config.json").is_file():
        raise MergeError(f"the causal-lm evaluator builds the model from {folder / 'config.json'}, which does not "
                         "exist; give Hugging Face model folders, or your own evaluator with a model factory "
                         "(model=)", option="model")
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:
        raise MergeError(f"{folder}: cannot build a causal LM from its config.json "
                         f"({type(exc).__name__}: {exc})") from exc
    return _to_device(model, device)


def causal_lm_setup(first: Path, *, text: Path | None = None, tokens: Path | None = None,
                    tokenizer: Path | None = None, seq_len: int = 128, max_batches: int = 16,
                    batch_size: int | None = None, device: str | None = None) -> Setup:
    """Mean next-token loss of the causal LM of `first`'s config.json, on `text` or on `tokens` (ids)."""
    if (text is None) == (tokens is None):
        raise MergeError("the causal-lm evaluator reads one of text= (a text file, tokenized with tokenizer=, "
                         "default the first model's folder) or tokens= (a torch file of token ids), not both "
                         "or neither", option="text")
    template = _hf_causal_lm(first, device)
    if tokens is not None:
        with fixed_by("tokens"):
            source, what = token_ids(tokens), f"tokens {tokens}"
    else:
        source, what = text, f"text {text}"
    tokenizer = tokenizer or first
    if not Path(tokenizer).is_dir():
        raise MergeError(f"tokenizer {tokenizer} is not a folder; give a local tokenizer folder", option="tokenizer")
    try:
        evaluator = ev.causal_lm_evaluator(source, seq_len, max_batches, batch_size=batch_size or 4,
                                           tokenizer=tokenizer)
    except MergeError:
        raise
    except Exception as exc:  # transformers' own errors for a folder without tokenizer files
        raise MergeError(f"tokenizer {tokenizer}: cannot load a tokenizer ({type(exc).__name__}: {exc}); give "
                         "tokenizer= a folder with tokenizer files, or tokens= (token ids)",
                         option="tokenizer") from exc
    return Setup(template, evaluator, f"causal-lm loss on {what}, seq_len {seq_len}")


def classifier_setup(data: Path, model: str, *, batch_size: int | None = None, device: str | None = None) -> Setup:
    """Cross-entropy and accuracy on `data` (inputs and labels) of the network `model` (module:factory) builds."""
    with fixed_by("data"):
        X, y = inputs_and_labels(load_torch_file(data, "data"), data, "data")
    if y is None:
        raise MergeError(f"data {data}: holds inputs only; save {{'X': inputs, 'y': labels}}", option="data")
    evaluator = ev.classifier_evaluator(X, y, batch_size=batch_size or 256)
    return Setup(factory_module(model, device), evaluator, f"classifier on {data} ({len(y)} examples)")


def function_setup(function: str, first: Path | Checkpoint, *, model: str | None = None,
                   device: str | None = None) -> Setup:
    """Your `function` (module:function or file.py:function): given the module `model` builds, or without
    `model`, the state dict (a template read from the first model, `first`: its path or open Checkpoint)."""
    fn = ev.load_evaluator(function)
    if model is not None:
        return Setup(factory_module(model, device), fn, f"{function} on {model}")
    if not isinstance(first, Checkpoint):
        with Checkpoint(first) as ck:
            return function_setup(function, ck)
    return Setup(StateDictTemplate(read_state(first)), _on_state_dict(fn), f"{function} on state dicts")


def bn_batches(bn_data: Path | None, template: nn.Module, batch_size: int | None = None) -> list[torch.Tensor] | None:
    """Batches of the inputs in `bn_data` that recompute `template`'s batch-norm statistics (None: no file)."""
    if bn_data is None:
        return None
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in template.modules()):
        raise MergeError("bn_data: the model has no batch-norm layers; leave bn_data out", option="bn_data")
    with fixed_by("bn_data"):
        X, _ = inputs_and_labels(load_torch_file(bn_data, "bn_data"), bn_data, "bn_data")
    size = batch_size or 256
    return [X[i:i + size] for i in range(0, len(X), size)]


def prepare(build: Callable[[Path, Checkpoint], Setup],
            models: Sequence[Path]) -> tuple[Setup, list[dict[str, torch.Tensor]]]:
    """`build(first model, its open Checkpoint)`'s setup and the models' state dicts (opened first, so a bad
    path fails before any work)."""
    checkpoints = [Checkpoint(m) for m in models]
    try:
        setup = build(Path(models[0]), checkpoints[0])
        want = list(setup.template.state_dict())
        # A state-dict template was built from the first model: reuse it rather than read that model twice.
        held = setup.template.tensors if isinstance(setup.template, StateDictTemplate) else None
        states = [held if i == 0 and held is not None else read_state(ck, want) for i, ck in enumerate(checkpoints)]
    finally:
        for ck in checkpoints:
            ck.close()
    ev.float_keys(dict(zip(map(str, models), states)))  # names and shapes agree; errors name the files
    return setup, states


def model_labels(models: Sequence[Path]) -> list[str]:
    from mergelab.analysis.recommend import short_names

    return short_names([str(m) for m in models])
