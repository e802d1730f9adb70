"""The evaluator options of `mergelab analyze` (path, scaling, plane) and `mergelab soup/sweep/search`.

Evaluator SPEC (`--eval`):
    causal-lm          mean next-token loss of a Hugging Face causal LM, built from the
                       first model's config.json, on --text FILE (tokenized with
                       --tokenizer, default the first model's folder) or --tokens F.pt;
    classifier         cross-entropy and accuracy on --data F.pt ({"X": ..., "y": ...} or
                       (X, y)) of the nn.Module that --model module:factory builds;
    module:function    a user function (also path/to/file.py:function) returning a dict of
                       metrics. With --model it is called with the module, weights loaded;
                       without, with the state dict itself (name -> tensor).

This module checks which options go together and calls the builder of
`mergelab.analysis.eval_setup` the SPEC names (imported when a command runs, so
that `mergelab --help` does not load torch).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from mergelab.errors import MergeError

if TYPE_CHECKING:
    from mergelab.analysis.eval_setup import Setup
    from mergelab.checkpoint.reader import Checkpoint

BUILT_IN = ("causal-lm", "classifier")


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


def _reject(o: EvalOptions, kind: str, *names: str) -> None:
    """Options that `kind` would ignore are an error, not a silent no-op."""
    given = [f"--{n.replace('_', '-')}" for n in names if getattr(o, n) is not None]
    if given:
        raise MergeError(f"{', '.join(given)} not used by --eval {kind}; leave {'them' if len(given) > 1 else 'it'} "
                         "out (see `mergelab analyze path --help` for which evaluator reads which option)")


def _check_device(device: str | None) -> None:
    """A --device torch cannot parse, named with the flag before any model is built."""
    if device is None:
        return
    import torch

    try:
        torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise MergeError(f"--device {device}: cannot move the model there ({exc}); use cpu, cuda or cuda:N") from None


def _causal_lm(o: EvalOptions, first: Path) -> Setup:
    from mergelab.analysis.eval_setup import causal_lm_setup

    _reject(o, "causal-lm", "model", "data", "bn_data")
    if (o.text is None) == (o.tokens is None):
        raise MergeError("--eval causal-lm needs one of --text FILE (tokenized with --tokenizer, default the "
                         "first model's folder) or --tokens F.pt (token ids), not both or neither")
    if o.tokens is not None:
        _reject(o, "causal-lm with --tokens", "tokenizer")
    _check_device(o.device)
    return causal_lm_setup(first, text=o.text, tokens=o.tokens, tokenizer=o.tokenizer, seq_len=o.seq_len,
                           max_batches=o.max_batches, batch_size=o.batch_size, device=o.device)


def _classifier(o: EvalOptions) -> Setup:
    from mergelab.analysis.eval_setup import classifier_setup

    _reject(o, "classifier", "text", "tokens", "tokenizer")
    if o.data is None or o.model is None:
        raise MergeError("--eval classifier needs --data F.pt (inputs and labels) and --model module:factory "
                         "(builds the network)")
    _check_device(o.device)
    return classifier_setup(o.data, o.model, batch_size=o.batch_size, device=o.device)


def _function(o: EvalOptions, first: Path | Checkpoint) -> Setup:
    from mergelab.analysis.eval_setup import function_setup

    _reject(o, o.spec, "data", "text", "tokens", "tokenizer")
    if o.model is None:
        if o.bn_data is not None:
            raise MergeError("--bn-data needs a module to refresh; give --model module:factory")
        _reject(o, f"{o.spec} without --model (it is given CPU state dicts)", "device")
    _check_device(o.device)
    return function_setup(o.spec, first, model=o.model, device=o.device)


def make_setup(o: EvalOptions, first: Path, first_checkpoint: Checkpoint | None = None) -> Setup:
    """The template model and evaluator of `o`; `first` is the first model (config, tokenizer, or the
    state-dict template of a user function without --model, read from `first_checkpoint` if given)."""
    from mergelab.analysis.eval_setup import bn_batches

    if o.spec == "causal-lm":
        setup = _causal_lm(o, Path(first))
    elif o.spec == "classifier":
        setup = _classifier(o)
    elif ":" in o.spec:
        setup = _function(o, Path(first) if first_checkpoint is None else first_checkpoint)
    else:
        raise MergeError(f"--eval {o.spec!r} is not an evaluator: use {' or '.join(BUILT_IN)}, or name your "
                         "function as module:function or path/to/file.py:function")
    setup.refresh_bn = bn_batches(o.bn_data, setup.template, o.batch_size)
    return setup


def prepare(o: EvalOptions, models: list[Path]) -> tuple[Setup, list[Any]]:
    """The setup for `o` and the models' state dicts (opened first, so a bad path fails before any work)."""
    from mergelab.analysis import eval_setup

    return eval_setup.prepare(lambda first, ck: make_setup(o, first, ck), models)
