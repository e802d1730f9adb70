"""Weight and activation matching: exact recovery of random permutations, function preserved,
objective monotone and equal to an independent computation."""

from __future__ import annotations

import pytest
import torch
from align_models import MLP, ResNetish, tiny_bert, tiny_gpt2, tiny_llama, train

import mergelab.align as al


def _data(seed=0, n=64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=g), torch.randint(0, 4, (n,), generator=g)


def _images(seed=0, n=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def _tokens(seed=0):
    return torch.randint(0, 50, (4, 10), generator=torch.Generator().manual_seed(seed))


def _permuted(model, spec, seed=1):
    """B = A with every group's units permuted at random (same function, different basis)."""
    perms = al.random_perms(spec, torch.Generator().manual_seed(seed))
    import copy

    b = copy.deepcopy(model)
    b.load_state_dict(al.apply_permutations(spec, model.state_dict(), perms))
    return b, perms


def _trained_models():
    x, y = _data()
    xi, yi = _images()
    torch.manual_seed(0)
    ids = _tokens()
    bert, llama = tiny_bert(0), tiny_llama(0)
    for lm in (bert, llama):
        train(lm, ids, ids, steps=4, lr=0.01)
    return {"mlp": (train(MLP(), x, y, steps=25), x), "cnn": (train(ResNetish(), xi, yi, steps=10), xi),
            "bert": (bert, {"input_ids": ids}), "llama": (llama, {"input_ids": ids})}


@pytest.fixture(scope="module")
def trained():
    return _trained_models()


def _out(model, x):
    with torch.no_grad():
        out = model(**x) if isinstance(x, dict) else model(x)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("name", ["mlp", "cnn", "bert", "llama"])
@pytest.mark.parametrize("method", ["weight_matching", "activation_matching"])
def test_random_permutation_recovered_exactly(trained, name, method):
    model, x = trained[name]
    spec = al.spec_for(model)
    if name in ("bert", "llama"):  # every kind of group is exercised, incl. heads and the residual stream
        assert {"residual", "heads.0", "mlp.1"} <= set(spec.groups)
    b, true = _permuted(model, spec)
    assert any((p != torch.arange(len(p))).any() for p in true.values())
    aligned, perms = al.align(model, b, method, data=[x])
    for g, p in true.items():
        assert torch.equal(perms[g], al.inverse(p)), g
    for k, v in model.state_dict().items():
        assert torch.equal(aligned.state_dict()[k], v), k


@pytest.mark.parametrize("name", ["mlp", "cnn", "bert", "llama", "gpt2"])
def test_aligned_b_computes_what_b_computes(name):
    """Two independent models: aligned B is a different point in weight space with B's outputs."""
    x, y = _data(1)
    xi, _ = _images(1)
    ids = _tokens(1)
    make = {"mlp": (lambda s: (torch.manual_seed(s), MLP())[1], x),
            "cnn": (lambda s: (torch.manual_seed(s), ResNetish())[1], xi),
            "bert": (tiny_bert, {"input_ids": ids}), "llama": (tiny_llama, {"input_ids": ids}),
            "gpt2": (tiny_gpt2, {"input_ids": ids})}
    factory, inp = make[name]
    a, b = factory(0), factory(1)
    if name == "cnn":  # non-trivial batch-norm statistics
        b.train()
        _out(b, inp)
        b.eval()
    aligned, perms = al.align(a, b)
    assert any((p != torch.arange(len(p))).any() for p in perms.values())
    torch.testing.assert_close(_out(aligned, inp), _out(b, inp), atol=1e-5, rtol=0)
    assert not torch.equal(next(iter(aligned.parameters())), next(iter(b.parameters()))) or name == "gpt2"


def test_objective_monotone_and_equal_to_permutation_matrices():
    torch.manual_seed(3)
    a, b = MLP(width=20), MLP(width=20)
    spec = al.spec_for(a)
    _, perms, result = al.align(a, b, return_result=True)
    hist = result.objective
    assert len(hist) >= 2 and all(y > x for x, y in zip(hist, hist[1:]))

    # independent: sum_l tr(W_a^T P_l W_b P_{l-1}^T) + <b_a, P_l b_b> with explicit permutation matrices
    def P(g):
        return torch.eye(20, dtype=torch.float64)[perms[g]] if g else None

    sa = {k: v.double() for k, v in a.state_dict().items()}
    sb = {k: v.double() for k, v in b.state_dict().items()}
    total, prev = 0.0, None
    for i in range(3):
        p = P(f"P_layers.{i}")
        wb = p @ sb[f"layers.{i}.weight"]
        wb = wb @ prev.T if prev is not None else wb
        total += float((sa[f"layers.{i}.weight"] * wb).sum() + (sa[f"layers.{i}.bias"] * (p @ sb[f"layers.{i}.bias"])).sum())
        prev = p
    total += float((sa["head.weight"] * (sb["head.weight"] @ prev.T)).sum())
    assert hist[-1] == pytest.approx(total, rel=1e-9)
    assert al.objective(spec, sa, sb, perms) == pytest.approx(total, rel=1e-9)
    # the optimum beats the identity and a random permutation
    assert total > hist[0]
    assert total >= al.objective(spec, sa, sb, al.random_perms(spec, torch.Generator().manual_seed(0)))


def test_align_many_and_state_dicts():
    torch.manual_seed(4)
    ref, others = MLP(), [MLP(), MLP()]
    spec = al.spec_for(ref)
    out = al.align_many(ref, [m.state_dict() for m in others], spec=spec)
    x, _ = _data(2)
    for (sd, _), m in zip(out, others):
        fresh = MLP()
        fresh.load_state_dict(sd)
        torch.testing.assert_close(fresh(x), m(x), atol=1e-5, rtol=0)
