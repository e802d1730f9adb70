"""Diagonal Fisher by vmap against a per-example autograd loop; stats checkpoints on disk."""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

from mergelab.errors import StatsError
from mergelab.stats import diagonal_fisher, load_stats, read_stats_meta, save_stats, validate_stats
from mergelab.stats.fisher import VmapFallbackWarning


def tiny_mlp(seed=0, classes=3):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, classes))


def data(n=10, seed=0, classes=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, classes, (n,), generator=g)


def loop_fisher(model, x, y=None):
    """The reference: one autograd pass per example (and per class for the exact Fisher)."""
    names = [n for n, _ in model.named_parameters()]
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for k in range(x.shape[0]):
        lp = torch.log_softmax(model(x[k:k + 1])[0], dim=-1)
        classes = range(lp.shape[0]) if y is None else [int(y[k])]
        for c in classes:
            grads = torch.autograd.grad(lp[c], list(model.parameters()), retain_graph=True)
            weight = lp[c].exp().detach() if y is None else 1.0
            for n, g in zip(names, grads):
                total[n] += weight * g**2
    return {n: t / x.shape[0] for n, t in total.items()}


def assert_same(got, want):
    assert set(got) == set(want)
    for n in want:
        assert_close(got[n], want[n], rtol=1e-4, atol=1e-7)


def test_exact_and_empirical_match_a_per_example_loop():
    model, (x, y) = tiny_mlp(), data()
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]
    exact = diagonal_fisher(model, batches, kind="exact")
    assert exact.count == 10 and exact.kind == "fisher" and exact.extra["estimator"] == "exact"
    assert_same(exact, loop_fisher(model, x))
    assert_same(diagonal_fisher(model, batches, kind="empirical"), loop_fisher(model, x, y))
    # Dict batches, and max_examples cutting a batch in two.
    dict_batches = [{"input": x[:6], "labels": y[:6]}, {"input": x[6:], "labels": y[6:]}]

    class Keyword(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, input):
            return self.net(input)

    cut = diagonal_fisher(Keyword(), dict_batches, kind="empirical", max_examples=7)
    assert cut.count == 7
    assert_same({n.removeprefix("net."): t for n, t in cut.items()}, loop_fisher(model, x[:7], y[:7]))


def test_sampled_equals_empirical_on_argmax_when_the_model_is_certain():
    model, (x, _) = tiny_mlp(), data()
    with torch.no_grad():
        model[2].weight.mul_(1e3)  # logits so far apart that p(argmax) = 1 in float32
    y = model(x).argmax(-1)
    sampled = diagonal_fisher(model, [(x, None)], kind="sampled", generator=torch.Generator().manual_seed(0))
    assert_same(sampled, diagonal_fisher(model, [(x, y)], kind="empirical"))


class SequenceModel(torch.nn.Module):
    """(batch, seq) token ids -> (batch, seq, C) logits, with tied embedding and output weights."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.embed = torch.nn.Embedding(7, 4)
        self.out = torch.nn.Linear(4, 7, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, input_ids):
        return self.out(torch.tanh(self.embed(input_ids)))


def test_sequence_logits_with_ignored_positions_and_tied_weights():
    model = SequenceModel()
    ids = torch.randint(0, 7, (3, 5), generator=torch.Generator().manual_seed(2))
    labels = ids.roll(-1, dims=1)
    labels[0, 3:] = -100
    fisher = diagonal_fisher(model, [{"input_ids": ids, "labels": labels}], kind="empirical")
    ref = torch.zeros(7, 4)
    for k in range(3):
        lp = torch.log_softmax(model(ids[k:k + 1])[0], dim=-1)
        keep = labels[k] != -100
        ll = lp[keep.nonzero()[:, 0], labels[k][keep]].sum()
        ref += torch.autograd.grad(ll, model.embed.weight)[0] ** 2
    assert_close(fisher["embed.weight"], ref / 3, rtol=1e-4, atol=1e-7)
    assert fisher["out.weight"] is fisher["embed.weight"]  # the tied name gets the same statistics
    with pytest.raises(StatsError, match="kind='sampled'"):
        diagonal_fisher(model, [{"input_ids": ids}], kind="exact")


class Branchy(torch.nn.Module):
    """A forward that branches on tensor values, as Hugging Face mask code does: vmap cannot batch it."""

    def __init__(self):
        super().__init__()
        self.net = tiny_mlp()

    def forward(self, x):
        if bool((x > 100).any()):
            x = x.clamp_max(100)
        return self.net(x)


def test_models_vmap_cannot_batch_fall_back_to_a_loop():
    model, (x, y) = Branchy(), data()
    with pytest.warns(VmapFallbackWarning):
        got = diagonal_fisher(model, [(x, y)], kind="exact")
    assert_same({n.removeprefix("net."): t for n, t in got.items()}, loop_fisher(model.net, x))


def test_bad_calls():
    model, (x, y) = tiny_mlp(), data()
    with pytest.raises(StatsError, match="not one of"):
        diagonal_fisher(model, [(x, y)], kind="hessian")
    with pytest.raises(StatsError, match="needs labels"):
        diagonal_fisher(model, [x], kind="empirical")
    with pytest.raises(StatsError, match="applies to kind=.empirical. only"):
        diagonal_fisher(model, [(x, y)], kind="exact", loss_fn=torch.nn.functional.cross_entropy)
    with pytest.raises(StatsError, match="no examples"):
        diagonal_fisher(model, [], kind="exact")
    model.train()
    diagonal_fisher(model, [(x, y)])
    assert model.training  # the mode is restored


def test_stats_checkpoint_round_trip(tmp_path):
    model, (x, y) = tiny_mlp(), data()
    fisher = diagonal_fisher(model, [(x, y)], kind="empirical")
    path = save_stats(tmp_path / "a" / "fisher.safetensors", fisher)
    tensors, meta = load_stats(path)
    assert meta == {"kind": "fisher", "count": 10, "extra": {"estimator": "empirical"}}
    assert read_stats_meta(path) == meta and tensors.count == 10
    assert_same(tensors, fisher)
    assert [p.name for p in path.parent.iterdir()] == ["fisher.safetensors"]  # no temporary left behind
    # Readable lazily, like weights, by the engine's Checkpoint.
    from mergelab.checkpoint.reader import Checkpoint

    with Checkpoint(path) as ck:
        assert_close(ck["0.weight"], fisher["0.weight"])
        validate_stats(ck, {n: p.shape for n, p in model.named_parameters()}, kind="fisher")


def test_stats_checkpoint_errors(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(StatsError, match="non-finite"):
        save_stats(tmp_path / "nan.safetensors", {"w": torch.tensor([1.0, float("nan")])}, kind="fisher")
    with pytest.raises(StatsError, match="kind"):
        save_stats(tmp_path / "k.safetensors", {"w": torch.ones(2)})
    assert not list(tmp_path.iterdir())  # nothing written on failure
    save_file({"w": torch.ones(2)}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(StatsError, match="not a mergelab stats checkpoint"):
        load_stats(tmp_path / "weights.safetensors")
    save_file({"w": torch.ones(2)}, str(tmp_path / "v9.safetensors"),
              metadata={"format": "mergelab-stats", "version": "9", "kind": "fisher", "extra": json.dumps({})})
    with pytest.raises(StatsError, match="version"):
        read_stats_meta(tmp_path / "v9.safetensors")


def test_validate_stats_reports_every_problem():
    shapes = {"a.weight": (3, 4), "a.bias": (3,), "b.weight": (2, 3)}
    with pytest.raises(StatsError, match="3 problems") as err:
        validate_stats({"a.weight": torch.ones(4, 3), "a.bias": torch.ones(3), "c.weight": torch.ones(1)},
                       shapes, kind="fisher", source="f.safetensors")
    text = str(err.value)
    assert "f.safetensors" in text and "'c.weight'" in text and "'b.weight'" in text and "(4, 3)" in text
    # Gram matrices: optional per tensor, (in, in) for an (out, in) weight, never for a 1-D tensor.
    validate_stats({"a.weight": torch.ones(4, 4)}, shapes, kind="gram")
    with pytest.raises(StatsError, match=r"needs \(3, 3\)"):
        validate_stats({"b.weight": torch.ones(2, 2)}, shapes, kind="gram")
    with pytest.raises(StatsError, match="not a 2-D weight"):
        validate_stats({"a.bias": torch.ones(3, 3)}, shapes, kind="gram")
