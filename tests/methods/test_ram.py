"""Tests of methods/ram.py: ram and ramplus_tl.

References: hand-worked cases, the formula written a second way (entry by entry in plain
Python), MergeKit 0.1.5's own functions on the same tensors, and a whole-model merge through
mergekit 0.1.5 on tiny Llama checkpoints with sparse task vectors (where RAM differs from a mean).
"""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

import mergelab
from mergelab.methods import get_method
from method_helpers import merge, mergekit, randn  # noqa: E402

SETTINGS = settings(max_examples=25, deadline=None)


def test_parameters_and_defaults_as_mergekit():
    ram, plus = get_method("ram"), get_method("ramplus_tl")
    assert ram.needs_base and plus.needs_base
    assert ram.shared_params().epsilon == 1e-5
    d = plus.shared_params()
    assert (d.r, d.alpha, d.epsilon) == (0.1, 0.2, 1e-5)
    assert set(ram.parameter_names()) == {"epsilon"} and set(plus.parameter_names()) == {"r", "alpha", "epsilon"}
    with pytest.raises(ValidationError):
        ram.shared_params(epsilon=-1.0)


def test_ram_by_hand():
    base = torch.zeros(5)
    a = torch.tensor([1.0, 0.0, 2.0, 0.0, 4e-6])
    b = torch.tensor([3.0, 0.0, 0.0, -1.0, 0.0])
    # entry 0: both changed -> mean 2; 1: nobody; 2: only a -> 2 whole; 3: only b -> -1;
    # 4: a's change is below epsilon -> unchanged.
    assert merge("ram", [a, b], base).tolist() == [2.0, 0.0, 2.0, -1.0, 0.0]
    # A larger epsilon leaves entry 3 (|-1| <= 1) unchanged, and entry 0 then is a's alone.
    assert merge("ram", [a, b], base, epsilon=1.0).tolist() == [3.0, 0.0, 2.0, 0.0, 0.0]


def test_ramplus_by_hand():
    base = torch.zeros(4)
    a = torch.tensor([1.0, 2.0, 5.0, 0.0])
    b = torch.tensor([3.0, 0.0, 0.0, 0.0])
    # a: 1 shared, 2 unique entries -> rho 0.5; b: 1 shared, 0 unique -> rho = 1/eps, capped.
    # lambda_a = 1 + r * min(0.5, alpha); b has no unique entry to scale.
    got = merge("ramplus_tl", [a, b], base, r=0.1, alpha=0.2)
    lam = 1 + 0.1 * 0.2
    torch.testing.assert_close(got, torch.tensor([2.0, 2.0 * lam, 5.0 * lam, 0.0]))
    got = merge("ramplus_tl", [a, b], base, r=0.4, alpha=1.0)
    lam = 1 + 0.4 * 0.5
    torch.testing.assert_close(got, torch.tensor([2.0, 2.0 * lam, 5.0 * lam, 0.0]))


def _entrywise(xs, base, eps, lam=None):
    """RAM written entry by entry: a second formula to check the vectorised one against."""
    out = []
    for j in range(base.numel()):
        changes = [float(x.reshape(-1)[j] - base.reshape(-1)[j]) for x in xs]
        who = [i for i, c in enumerate(changes) if abs(c) > eps]
        if len(who) == 1:
            i = who[0]
            out.append(float(base.reshape(-1)[j]) + changes[i] * (lam[i] if lam else 1.0))
        elif who:
            out.append(float(base.reshape(-1)[j]) + sum(changes[i] for i in who) / len(who))
        else:
            out.append(float(base.reshape(-1)[j]))
    return torch.tensor(out).reshape(base.shape)


def _sparse(base, seed, keep=0.4):
    """base + a task vector that touches about `keep` of the entries."""
    mask = torch.rand(base.shape, generator=torch.Generator().manual_seed(seed)) < keep
    return torch.where(mask, base + 0.1 * randn(*base.shape, seed=seed + 50), base)


@SETTINGS
@given(n=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_ram_equals_entrywise_formula(n, seed):
    base = randn(3, 7, seed=seed)
    xs = [_sparse(base, seed + i + 1) for i in range(n)]
    torch.testing.assert_close(merge("ram", xs, base), _entrywise(xs, base, 1e-5), rtol=1e-6, atol=1e-6)


@SETTINGS
@given(n=st.integers(1, 4), seed=st.integers(0, 10_000), r=st.floats(0, 2), alpha=st.floats(0, 3))
def test_ramplus_equals_entrywise_formula(n, seed, r, alpha):
    base = randn(3, 7, seed=seed)
    xs = [_sparse(base, seed + i + 1) for i in range(n)]
    changed = [((x - base).abs() > 1e-5).reshape(-1) for x in xs]
    count = torch.stack(changed).sum(0)
    lam = []
    for c in changed:
        shared, unique = int((c & (count > 1)).sum()), int((c & (count == 1)).sum())
        lam.append(1 + r * min(max(shared / max(unique, 1e-5), 0.0), alpha))
    torch.testing.assert_close(merge("ramplus_tl", xs, base, r=r, alpha=alpha), _entrywise(xs, base, 1e-5, lam),
                               rtol=1e-5, atol=1e-6)


def test_ram_is_elementwise_and_ramplus_is_not():
    """ram may be merged in row chunks (the engine's `elementwise`); ramplus_tl's counts span the tensor."""
    assert get_method("ram").elementwise and not get_method("ramplus_tl").elementwise
    base = randn(10, 8, seed=5)
    xs = [_sparse(base, 6), _sparse(base, 7), _sparse(base, 8)]
    whole = merge("ram", xs, base)
    halves = torch.cat([merge("ram", [x[:4] for x in xs], base[:4]), merge("ram", [x[4:] for x in xs], base[4:])])
    assert torch.equal(whole, halves)


@SETTINGS
@given(seed=st.integers(0, 10_000))
def test_the_order_of_the_models_does_not_matter(seed):
    base = randn(5, 6, seed=seed)
    xs = [_sparse(base, seed + i + 1) for i in range(3)]
    for name in ("ram", "ramplus_tl"):
        torch.testing.assert_close(merge(name, xs, base), merge(name, xs[::-1], base), rtol=1e-6, atol=1e-7)


def test_a_single_model_is_returned_and_identical_models_are_a_fixed_point():
    base = randn(4, 6, seed=1)
    x = _sparse(base, 2)
    torch.testing.assert_close(merge("ram", [x], base), x)
    torch.testing.assert_close(merge("ram", [x, x, x], base), x)
    torch.testing.assert_close(merge("ramplus_tl", [x, x], base), x)


@pytest.mark.mergekit
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_same_as_mergekit_functions(n, dtype):
    base = randn(16, 12, seed=0, dtype=dtype)
    xs = [_sparse(base, 10 + i).to(dtype) for i in range(n)]
    torch.testing.assert_close(merge("ram", xs, base), mergekit("ram", [base, *xs], 0), rtol=0, atol=0)
    torch.testing.assert_close(merge("ram", xs, base, epsilon=0.05),
                               mergekit("ram", [base, *xs], 0, epsilon=0.05), rtol=0, atol=0)
    for r, alpha in ((0.1, 0.2), (0.05, 1.0), (1.5, 3.0)):
        torch.testing.assert_close(merge("ramplus_tl", xs, base, r=r, alpha=alpha),
                                   mergekit("ramplus_tl", [base, *xs], 0, r=r, alpha=alpha).to(dtype),
                                   rtol=1e-7, atol=1e-7)


# ---- whole models through both tools ------------------------------------------------------------

@pytest.fixture(scope="module")
def sparse_family(llama_family, tmp_path_factory):
    """The shared tiny Llama base and two fine-tunes that each changed ~40% of the entries."""
    root = tmp_path_factory.mktemp("ram_models")
    base = load_file(str(llama_family["base"] / "model.safetensors"))
    paths = {"base": llama_family["base"]}
    for i, name in enumerate(("sa", "sb")):
        folder = root / name
        shutil.copytree(llama_family["base"], folder)
        sd = {k: _sparse(v, 100 * i + j) if v.is_floating_point() else v
              for j, (k, v) in enumerate(sorted(base.items()))}
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
        paths[name] = folder
    return paths


@pytest.mark.mergekit
@pytest.mark.parametrize("method,params", [("ram", {}), ("ramplus_tl", {"r": 0.3, "alpha": 0.5})])
def test_whole_model_same_as_mergekit(method, params, sparse_family, tmp_path):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    recipe = {"merge_method": method, "base_model": str(sparse_family["base"]), "dtype": "float32",
              "models": [{"model": str(sparse_family[m])} for m in ("sa", "sb")]}
    if params:
        recipe["parameters"] = params
    text = yaml.safe_dump(recipe)
    run_merge(MergeConfiguration.model_validate(recipe), str(tmp_path / "mk"),
              options=MergeOptions(copy_tokenizer=False, quiet=True))
    mergelab.merge(text, tmp_path / "ml")
    theirs = load_file(str(tmp_path / "mk" / "model.safetensors"))
    ours = load_file(str(tmp_path / "ml" / "model.safetensors"))
    assert set(ours) == set(theirs)
    base = load_file(str(sparse_family["base"] / "model.safetensors"))
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-6, atol=1e-7, msg=lambda m: f"{k}: {m}")
    # Not a plain mean: the unique entries kept their whole change.
    key = "model.layers.0.mlp.up_proj.weight"
    a = load_file(str(sparse_family["sa"] / "model.safetensors"))[key]
    b = load_file(str(sparse_family["sb"] / "model.safetensors"))[key]
    only_a = ((a - base[key]).abs() > 1e-5) & ((b - base[key]).abs() <= 1e-5)
    assert only_a.any()
    if method == "ram":
        torch.testing.assert_close(ours[key][only_a], a[only_a])
    else:  # lambda_a > 1: the unique changes were scaled up
        assert ((ours[key][only_a] - base[key][only_a]).abs() > (a[only_a] - base[key][only_a]).abs()).all()
