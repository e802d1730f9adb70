"""Evaluator setup for `mergelab analyze`: command-line options -> template model and evaluator.

Evaluator SPEC (`--eval`):
    causal-lm          mean next-token loss of a Hugging Face causal LM, built from the
                       first model's config.json, on --text FILE (tokenized with
                       --tokenizer, default the first model's folder) or --tokens F.pt;
    classifier         cross-entropy and accuracy on --data F.pt ({"X": ..., "y": ...} or
                       (X, y)) of the nn.Module that --model module:factory builds;
    module:function    a user function (also path/to/file.py:function) returning a dict of
                       metrics. With --model it is called with the module, weights loaded;
                       without, with the state dict itself (name -> tensor).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from mergelab.analysis import evaluators as ev
from mergelab.checkpoint.reader import Checkpoint
from mergelab.checkpoint.state_file import read_data_file
from mergelab.errors import MergeError

BUILT_IN = ("causal-lm", "classifier")


# ----------------------------------------------------------------------------- files


def _load_torch_file(path: Path, what: str) -> Any:
    """A torch (weights_only) or safetensors file's contents; `what` names the option in errors."""
    if not path.is_file():
        raise MergeError(f"{what} {path} does not exist")
    try:
        return read_data_file(path)
    except Exception as exc:
        raise MergeError(f"{what} {path}: cannot read it as a torch or safetensors file "
                         f"({type(exc).__name__}: {exc})") from exc


def _inputs_and_labels(obj: Any, path: Path, what: str) -> tuple[torch.Tensor, torch.Tensor | None]:
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


def _token_ids(path: Path) -> torch.Tensor:
    obj = _load_torch_file(path, "--tokens")
    ids = obj.get("input_ids") if isinstance(obj, Mapping) else obj
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point():
        raise MergeError(f"--tokens {path}: expected an integer tensor of token ids (or {{'input_ids': ...}})")
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
class EvalOptions:
    """The evaluator options of path, scaling and plane, as given on the command line."""

    spec: str
    model: Optional[str] = None
    data: Optional[Path] = None
    text: Optional[Path] = None
    tokens: Optional[Path] = None
    tokenizer: Optional[Path] = None
    seq_len: int = 128
    max_batches: int = 16
    batch_size: Optional[int] = None
    bn_data: Optional[Path] = None
    device: Optional[str] = None  # None: cpu


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


def _reject(o: EvalOptions, kind: str, *names: str) -> None:
    """Options that `kind` would ignore are an error, not a silent no-op."""
    given = [f"--{n.replace('_', '-')}" for n in names if getattr(o, n) is not None]
    if given:
        raise MergeError(f"{', '.join(given)} not used by --eval {kind}; leave {'them' if len(given) > 1 else 'it'} "
                         "out (see `mergelab analyze path --help` for which evaluator reads which option)")


def _to_device(module: nn.Module, device: str | None) -> nn.Module:
    try:
        return module.to(device or "cpu")
    except (RuntimeError, AssertionError) as exc:  # an unknown name, or torch built without that backend
        raise MergeError(f"--device {device}: cannot move the model there ({exc}); use cpu, cuda or cuda:N") from exc


def _factory_module(spec: str, device: str | None) -> nn.Module:
    try:
        factory = ev.load_evaluator(spec)  # the same module:function import, reported as --model
    except MergeError as exc:
        raise MergeError(str(exc).replace(f"evaluator {spec!r}", f"--model {spec!r}", 1)) from exc
    try:
        module = factory()
    except Exception as exc:
        raise MergeError(f"--model {spec!r}: calling it failed ({type(exc).__name__}: {exc}); it must build "
                         "the model with no arguments") from exc
    if not isinstance(module, nn.Module):
        raise MergeError(f"--model {spec!r} returned {type(module).__name__}, not a torch nn.Module")
    return _to_device(module, device)


def _hf_causal_lm(folder: Path, device: str | None) -> nn.Module:
    if not (folder / "config.json").is_file():
        raise MergeError(f"--eval causal-lm builds the model from {folder / 'config.json'}, which does not "
                         "exist; give Hugging Face model folders, or use --model with your own evaluator")
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:
        raise MergeError(f"{folder}: cannot build a causal LM from its config.json "
                         f"({type(exc).__name__}: {exc})") from exc
    return _to_device(model, device)


def _causal_lm(o: EvalOptions, first: Path) -> Setup:
    _reject(o, "causal-lm", "model", "data", "bn_data")
    if (o.text is None) == (o.tokens is None):
        raise MergeError("--eval causal-lm needs one of --text FILE (tokenized with --tokenizer, default the "
                         "first model's folder) or --tokens F.pt (token ids), not both or neither")
    template = _hf_causal_lm(first, o.device)
    if o.tokens is not None:
        _reject(o, "causal-lm with --tokens", "tokenizer")
        source, what = _token_ids(o.tokens), f"tokens {o.tokens}"
    else:
        source, what = o.text, f"text {o.text}"
    tokenizer = o.tokenizer or first
    if not Path(tokenizer).is_dir():
        raise MergeError(f"--tokenizer {tokenizer} is not a folder; give a local tokenizer folder")
    try:
        evaluator = ev.causal_lm_evaluator(source, o.seq_len, o.max_batches, batch_size=o.batch_size or 4,
                                           tokenizer=tokenizer)
    except MergeError:
        raise
    except Exception as exc:  # transformers' own errors for a folder without tokenizer files
        raise MergeError(f"--tokenizer {tokenizer}: cannot load a tokenizer ({type(exc).__name__}: {exc}); pass "
                         "--tokenizer DIR with tokenizer files, or --tokens F.pt") from exc
    return Setup(template, evaluator, f"causal-lm loss on {what}, seq_len {o.seq_len}")


def _classifier(o: EvalOptions) -> Setup:
    _reject(o, "classifier", "text", "tokens", "tokenizer")
    if o.data is None or o.model is None:
        raise MergeError("--eval classifier needs --data F.pt (inputs and labels) and --model module:factory "
                         "(builds the network)")
    X, y = _inputs_and_labels(_load_torch_file(o.data, "--data"), o.data, "--data")
    if y is None:
        raise MergeError(f"--data {o.data}: holds inputs only; save {{'X': inputs, 'y': labels}}")
    evaluator = ev.classifier_evaluator(X, y, batch_size=o.batch_size or 256)
    return Setup(_factory_module(o.model, o.device), evaluator, f"classifier on {o.data} ({len(y)} examples)")


def _user(o: EvalOptions, first: Checkpoint) -> Setup:
    _reject(o, o.spec, "data", "text", "tokens", "tokenizer")
    fn = ev.load_evaluator(o.spec)
    if o.model is None:
        if o.bn_data is not None:
            raise MergeError("--bn-data needs a module to refresh; give --model module:factory")
        _reject(o, f"{o.spec} without --model (it is given CPU state dicts)", "device")
        return Setup(StateDictTemplate(read_state(first)), _on_state_dict(fn), f"{o.spec} on state dicts")
    return Setup(_factory_module(o.model, o.device), fn, f"{o.spec} on {o.model}")


def _bn_batches(o: EvalOptions, template: nn.Module) -> list[torch.Tensor] | None:
    if o.bn_data is None:
        return None
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in template.modules()):
        raise MergeError(f"--bn-data: the model of --eval {o.spec} has no batch-norm layers; leave --bn-data out")
    X, _ = _inputs_and_labels(_load_torch_file(o.bn_data, "--bn-data"), o.bn_data, "--bn-data")
    size = o.batch_size or 256
    return [X[i:i + size] for i in range(0, len(X), size)]


def make_setup(o: EvalOptions, first: Path, first_checkpoint: Checkpoint | None = None) -> Setup:
    """The template model and evaluator of `o`; `first` is the first model (config, tokenizer, or the
    state-dict template of a user function without --model, read from `first_checkpoint` if given)."""
    if o.spec == "causal-lm":
        setup = _causal_lm(o, Path(first))
    elif o.spec == "classifier":
        setup = _classifier(o)
    elif ":" in o.spec:
        if first_checkpoint is None:
            with Checkpoint(first) as ck:
                setup = _user(o, ck)
        else:
            setup = _user(o, first_checkpoint)
    else:
        raise MergeError(f"--eval {o.spec!r} is not an evaluator: use {' or '.join(BUILT_IN)}, or name your "
                         "function as module:function or path/to/file.py:function")
    setup.refresh_bn = _bn_batches(o, setup.template)
    return setup


def prepare(o: EvalOptions, models: Sequence[Path]) -> tuple[Setup, list[dict[str, torch.Tensor]]]:
    """The setup for `o` and the models' state dicts (opened first, so a bad path fails before any work)."""
    checkpoints = [Checkpoint(m) for m in models]
    try:
        setup = make_setup(o, Path(models[0]), checkpoints[0])
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
    from mergelab.analysis.inspect import short_names

    return short_names([str(m) for m in models])
