"""Built-in evaluators against losses computed by hand, user evaluators, and failure messages."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from mergelab.analysis.evaluators import (
    causal_lm_evaluator,
    classifier_evaluator,
    evaluate,
    load_evaluator,
)
from mergelab.errors import MergeError


def log_softmax_np(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def test_classifier_evaluator_matches_numpy():
    torch.manual_seed(0)
    net = nn.Linear(5, 3)
    X, y = torch.randn(23, 5), torch.randint(0, 3, (23,))
    net.train()
    got = classifier_evaluator(X, y, batch_size=4)(net)  # batches of 4 with a ragged last one
    logits = X.numpy() @ net.weight.detach().numpy().T + net.bias.detach().numpy()
    want_loss = -log_softmax_np(logits)[np.arange(23), y.numpy()].mean()
    assert got["loss"] == pytest.approx(want_loss, rel=1e-5)
    assert got["accuracy"] == pytest.approx(np.mean(logits.argmax(1) == y.numpy()))
    assert net.training  # the training flag is restored
    from_numpy = classifier_evaluator(X.double().numpy(), y.numpy().astype(np.float64))(net)
    assert from_numpy["loss"] == pytest.approx(got["loss"], rel=1e-6)


class TinyLM(nn.Module):
    def __init__(self, vocab=11, wrap=None):
        super().__init__()
        self.emb = nn.Embedding(vocab, vocab)
        self.wrap = wrap

    def forward(self, ids):
        logits = self.emb(ids)
        if self.wrap == "tuple":
            return (logits, None)
        if self.wrap == "object":
            return type("Out", (), {"logits": logits})()
        return logits


@pytest.mark.parametrize("wrap", [None, "tuple", "object"])
def test_causal_lm_loss_matches_a_window_by_window_sum(wrap):
    torch.manual_seed(0)
    lm = TinyLM(wrap=wrap)
    ids = torch.randint(0, 11, (50,))
    got = causal_lm_evaluator(ids, seq_len=8, max_batches=16, batch_size=4)(lm)["loss"]
    table = log_softmax_np(lm.emb.weight.detach().numpy())  # logits depend on the current token only
    n = (50 - 1) // 8 * 8  # six windows of 8 predictions
    want = -np.mean([table[ids[i], ids[i + 1]] for i in range(n)])
    assert got == pytest.approx(want, rel=1e-5)
    capped = causal_lm_evaluator(ids, seq_len=8, max_batches=1, batch_size=2)(lm)["loss"]
    assert capped == pytest.approx(-np.mean([table[ids[i], ids[i + 1]] for i in range(16)]), rel=1e-5)


def test_causal_lm_from_text_file(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("abcabcabcab", encoding="utf-8")
    ids = causal_lm_evaluator(text, seq_len=5, tokenizer=lambda s: [ord(c) - ord("a") for c in s])
    lm = TinyLM(vocab=3)
    assert ids(lm)["loss"] == pytest.approx(causal_lm_evaluator([0, 1, 2] * 3 + [0, 1], seq_len=5)(lm)["loss"])
    with pytest.raises(MergeError, match="pass tokenizer="):
        causal_lm_evaluator(text, seq_len=5)
    with pytest.raises(MergeError, match="too few"):
        causal_lm_evaluator([1, 2, 3], seq_len=5)


def test_load_evaluator_from_file_and_module(tmp_path):
    (tmp_path / "my_eval.py").write_text("def score(model):\n    return {'loss': 2.5}\n", encoding="utf-8")
    fn = load_evaluator(f"{tmp_path / 'my_eval.py'}:score")
    assert fn(None) == {"loss": 2.5}
    assert load_evaluator("math:sqrt") is math.sqrt
    for spec, message in [("no_colon", "expected 'module:function'"),
                          ("math:nope", "no callable named 'nope'"),
                          ("mergelab_no_such_module:f", "importing mergelab_no_such_module failed"),
                          (f"{tmp_path / 'missing.py'}:f", "does not exist")]:
        with pytest.raises(MergeError, match=message):
            load_evaluator(spec)


def test_evaluate_turns_failures_into_merge_errors():
    def boom(model):
        raise ValueError("bad batch")

    with pytest.raises(MergeError, match=r"evaluator .*boom failed at alpha=0.3: ValueError: bad batch"):
        evaluate(boom, nn.Linear(1, 1), "alpha=0.3")
    with pytest.raises(MergeError, match=r"returned loss=inf at lambda=2"):
        evaluate(lambda m: {"loss": float("inf")}, nn.Linear(1, 1), "lambda=2")
    with pytest.raises(MergeError, match="must return a non-empty dict"):
        evaluate(lambda m: 0.5, nn.Linear(1, 1), "alpha=0")
    with pytest.raises(MergeError, match="non-number for 'loss'"):
        evaluate(lambda m: {"loss": "low"}, nn.Linear(1, 1), "alpha=0")
    assert evaluate(lambda m: {"loss": torch.tensor(0.25)}, nn.Linear(1, 1), "alpha=0") == {"loss": 0.25}
