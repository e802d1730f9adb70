"""Pluggable evaluators: callables ``model -> {metric name: float}``.

Data-driven analyses (analysis/paths.py) load weights into a template module and
hand it to an evaluator. Built-ins cover a classifier on tensors and a causal LM's
loss on a text; anything else is a user function named ``module:function`` (or
``path/to/file.py:function``) and loaded with `load_evaluator`. Every call goes
through `evaluate`, which turns an exception or a non-finite metric into a
MergeError naming the evaluator and the point being evaluated.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from mergelab.errors import MergeError, ShapeMismatch

Evaluator = Callable[[nn.Module], Mapping[str, float]]
ModelLike = nn.Module | Callable[[], nn.Module]  # a template module, or a factory building one
StateLike = Mapping[str, torch.Tensor] | nn.Module


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode under no_grad, restoring the model's training flag afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def classifier_evaluator(X: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> Evaluator:
    """Mean cross-entropy loss and accuracy of a classifier on (X, y).

    Args:
        X: (n, *features) inputs (tensor or numpy array).
        y: (n,) class labels (converted to integers).
        batch_size: examples per forward pass.

    Returns:
        evaluator(model) -> {"loss": mean cross-entropy, "accuracy": share correct}, where
        model(X_batch) returns (batch, classes) logits.
    """
    X, y = torch.as_tensor(X), torch.as_tensor(y).long()  # numpy arrays welcome; labels as class indices
    if len(X) != len(y) or len(X) == 0:
        raise MergeError(f"classifier_evaluator: X has {len(X)} examples and y {len(y)}; give equal, nonzero counts")

    def evaluate_classifier(model: nn.Module) -> dict[str, float]:
        device, loss, correct = _device(model), 0.0, 0
        # Floating inputs follow the model's dtype (float64 data into a float32 model, say).
        dtype = next((p.dtype for p in model.parameters()), X.dtype) if X.is_floating_point() else X.dtype
        with _eval_mode(model):
            for start in range(0, len(X), batch_size):
                xb = X[start:start + batch_size].to(device, dtype)
                yb = y[start:start + batch_size].to(device)
                logits = model(xb)
                loss += float(F.cross_entropy(logits.float(), yb, reduction="sum"))
                correct += int((logits.argmax(dim=-1) == yb).sum())
        return {"loss": loss / len(X), "accuracy": correct / len(X)}

    return evaluate_classifier


def _tokenize(text: str, tokenizer: Any) -> list[int]:
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer  # optional dependency, only for a tokenizer folder

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
    ids = tokenizer.encode(text) if hasattr(tokenizer, "encode") else tokenizer(text)
    if isinstance(ids, Mapping):
        ids = ids["input_ids"]
    return list(ids)


def causal_lm_evaluator(text_file_or_ids: str | Path | Sequence[int] | torch.Tensor, seq_len: int = 128,
                        max_batches: int = 16, *, batch_size: int = 4, tokenizer: Any = None) -> Evaluator:
    """Mean next-token cross-entropy of a causal LM on a text.

    The token stream is cut into consecutive windows of seq_len + 1 tokens (each
    window predicts its last seq_len tokens from the ones before), batched by
    `batch_size`, and at most `max_batches` batches are used.

    Args:
        text_file_or_ids: a UTF-8 text file (needs `tokenizer`), or token ids (1-D).
        seq_len: tokens predicted per window.
        max_batches: cap on batches evaluated, to bound the cost of each point.
        batch_size: windows per forward pass.
        tokenizer: for a text file: an object with .encode(text), a callable
            text -> ids, or the path of a local Hugging Face tokenizer folder.

    Returns:
        evaluator(model) -> {"loss": mean cross-entropy per predicted token}; model(ids)
        returns logits (batch, seq, vocab), or an object with .logits, or a tuple (logits, ...).
    """
    if isinstance(text_file_or_ids, (str, Path)):
        if tokenizer is None:
            raise MergeError(f"causal_lm_evaluator: {text_file_or_ids} is a text file; pass tokenizer= (a local "
                             "tokenizer folder or an object with .encode) or pass token ids instead")
        try:
            text = Path(text_file_or_ids).read_text(encoding="utf-8")
        except OSError as exc:
            raise MergeError(f"causal_lm_evaluator: cannot read {text_file_or_ids} ({exc})") from exc
        ids = torch.tensor(_tokenize(text, tokenizer), dtype=torch.long)
    else:
        ids = torch.as_tensor(text_file_or_ids, dtype=torch.long).reshape(-1)
    windows = (len(ids) - 1) // seq_len
    if windows < 1:
        raise MergeError(f"causal_lm_evaluator: {len(ids)} tokens are too few for one window of seq_len={seq_len} "
                         "(needs seq_len + 1); give more text or a smaller seq_len")
    windows = min(windows, max_batches * batch_size)
    # (windows, seq_len + 1): consecutive windows sharing one token, so every token is predicted once.
    data = ids[: windows * seq_len + 1].unfold(0, seq_len + 1, seq_len)

    def evaluate_causal_lm(model: nn.Module) -> dict[str, float]:
        device, total = _device(model), 0.0
        with _eval_mode(model):
            for start in range(0, windows, batch_size):
                batch = data[start:start + batch_size].to(device)
                out = model(batch[:, :-1])
                logits = getattr(out, "logits", out[0] if isinstance(out, tuple) else out)
                total += float(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                               batch[:, 1:].reshape(-1), reduction="sum"))
        return {"loss": total / (windows * seq_len)}

    return evaluate_causal_lm


def load_evaluator(spec: str) -> Evaluator:
    """Import the evaluator named ``module:function`` or ``path/to/file.py:function``."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise MergeError(f"evaluator {spec!r}: expected 'module:function' or 'file.py:function'")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise MergeError(f"evaluator {spec!r}: file {path} does not exist")
            loader_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except MergeError:
        raise
    except SystemExit as exc:
        raise MergeError(f"evaluator {spec!r}: importing {module_name} called sys.exit({exc.code!r}); an evaluator "
                         "module must not exit the process") from None
    except Exception as exc:
        raise MergeError(f"evaluator {spec!r}: importing {module_name} failed ({type(exc).__name__}: {exc})") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise MergeError(f"evaluator {spec!r}: {module_name} has no callable named {attr!r}")
    return fn


def evaluator_name(evaluator: Callable) -> str:
    """A readable name for messages: module.qualname of a function, else its repr."""
    qual = getattr(evaluator, "__qualname__", None)
    return f"{getattr(evaluator, '__module__', '?')}.{qual}" if qual else repr(evaluator)


def evaluate(evaluator: Evaluator, model: nn.Module, at: str) -> dict[str, float]:
    """Run `evaluator` on `model` and check its result; `at` names the point, e.g. "alpha=0.3".

    Raises:
        MergeError: the evaluator raised, returned something other than a mapping of
            metric -> number, or a metric is NaN or infinite.
    """
    name = evaluator_name(evaluator)
    try:
        result = evaluator(model)
    except SystemExit as exc:  # sys.exit(0) in an evaluator is a failure, not a finished analysis
        raise MergeError(f"evaluator {name} called sys.exit({exc.code!r}) at {at}; an evaluator must return a "
                         "dict of metrics, not exit the process") from None
    except Exception as exc:
        raise MergeError(f"evaluator {name} failed at {at}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(result, Mapping) or not result:
        raise MergeError(f"evaluator {name} returned {type(result).__name__} at {at}; "
                         "it must return a non-empty dict of metric name -> number")
    metrics = {}
    for key, value in result.items():
        try:
            metrics[str(key)] = float(value)
        except (TypeError, ValueError):
            raise MergeError(f"evaluator {name} returned a non-number for {key!r} at {at}: {value!r}") from None
        if not math.isfinite(metrics[str(key)]):
            raise MergeError(f"evaluator {name} returned {key}={metrics[str(key)]} at {at}; the model "
                             "diverged there or the evaluator is broken (check its inputs and dtype)")
    return metrics


BatchNormRefresh = Callable[[nn.Module], None] | Iterable | None


def refresh_statistics(model: nn.Module, refresh_bn: BatchNormRefresh) -> None:
    """Recompute batch-norm statistics: call `refresh_bn(model)`, or pass over its batches."""
    if refresh_bn is None:
        return
    if callable(refresh_bn) and not isinstance(refresh_bn, nn.Module):
        refresh_bn(model)
        return
    if iter(refresh_bn) is refresh_bn:
        raise MergeError("refresh_bn is a one-shot iterator, used up after the first point; pass a list of "
                         "batches, a DataLoader, or a callable model -> None")
    from mergelab.trajectory.averager import refresh_batchnorm

    refresh_batchnorm(model, refresh_bn, device=_device(model))


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], at: str) -> None:
    """Copy `state` into `model` (strict: same names and shapes), naming the point on failure."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise MergeError(f"weights at {at} do not fit the template model: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}; the model factory must build the architecture of the checkpoints")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ShapeMismatch(f"tensor {k} has shape {tuple(v.shape)} at {at}, the template model has "
                                f"{tuple(own[k].shape)}; build the template with the checkpoints' config")
    model.load_state_dict(state, strict=True)


# ----------------------------------------------------------------------------- evaluating state dicts


def as_state(x: StateLike) -> Mapping[str, torch.Tensor]:
    """The state dict of a module, or the mapping itself."""
    return x.state_dict() if isinstance(x, nn.Module) else x


def float_keys(states: Mapping[str, Mapping[str, torch.Tensor]]) -> list[str]:
    """Names of the floating-point tensors, after checking every state has the same names and shapes."""
    (first_label, first), *rest = states.items()
    problems = []
    for label, sd in rest:
        missing, extra = [k for k in first if k not in sd], [k for k in sd if k not in first]
        if missing or extra:
            problems.append(f"{label} lacks {missing[:3]} and adds {extra[:3]} compared with {first_label}")
            continue
        problems += [f"{label} tensor {k} has shape {tuple(sd[k].shape)}, {first_label} has {tuple(v.shape)}"
                     for k, v in first.items() if tuple(sd[k].shape) != tuple(v.shape)]
    if problems:
        raise ShapeMismatch("; ".join(problems[:3]) + ". Paths and planes need models of one architecture.")
    return [k for k, v in first.items() if v.is_floating_point()]


@contextlib.contextmanager
def _template(model: ModelLike) -> Iterator[nn.Module]:
    """The module to load points into; a given module gets its own weights back afterwards."""
    if not isinstance(model, nn.Module):
        yield model()
        return
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        yield model
    finally:
        model.load_state_dict(saved)


def evaluate_points(model: ModelLike, points: Iterable[tuple[str, dict[str, torch.Tensor]]], evaluator: Evaluator,
                     refresh_bn: BatchNormRefresh) -> dict[str, list[float]]:
    """Metrics at each (label, state) point, as metric name -> list over points.

    Loads each state into the template, refreshes batch-norm statistics if asked, and
    evaluates through `evaluate`, so a failure names the point (the label).
    """
    metrics: dict[str, list[float]] = {}
    with _template(model) as module:
        for k, (at, state) in enumerate(points):
            load_weights(module, state, at)
            try:
                refresh_statistics(module, refresh_bn)
            except MergeError:
                raise
            except Exception as exc:
                raise MergeError(f"batch-norm refresh failed at {at}: {type(exc).__name__}: {exc}; check that "
                                 "refresh_bn yields inputs the model accepts") from exc
            result = evaluate(evaluator, module, at)
            if k and set(result) != set(metrics):
                raise MergeError(f"evaluator returned metrics {sorted(result)} at {at} but {sorted(metrics)} "
                                 "before; it must return the same metric names at every point")
            for name, value in result.items():
                metrics.setdefault(name, []).append(value)
    return metrics
