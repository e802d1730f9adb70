"""Tests of methods/fusion.py: arcee_fusion.

References: a hand-worked case, the importance and fence written a second way (numpy's
percentiles with method="lower", scipy's relative entropy), MergeKit 0.1.5's own function on
the same tensors, and a whole-model merge through mergekit 0.1.5 on tiny Llama checkpoints.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

import mergelab
from mergelab.methods import get_method
from mergelab.methods.fusion import QUANTILE_SAMPLE, arcee_fusion, fusion_importance, lower_quantiles
from method_helpers import merge, mergekit, randn  # noqa: E402


def test_contract_as_mergekit():
    spec = get_method("arcee_fusion")
    assert spec.needs_base and spec.min_models == spec.max_models == 1
    assert spec.parameter_names() == []


def test_only_the_outlier_change_is_kept_by_hand():
    # A vector has one KL value for its only row, so importance = KL * |delta| ranks like |delta|.
    # Deltas 0.01, 0.02, ..., 0.19 and one 3.0.
    base = torch.zeros(20)
    delta = torch.cat([torch.arange(1, 20) * 0.01, torch.tensor([3.0])])
    theta = base + delta
    got = merge("arcee_fusion", [theta], base)
    # sorted |delta| index floor(q * 19): Q1 = d[4] = 0.05, median = d[9] = 0.10, Q3 = d[14] = 0.15;
    # fence = 0.10 + 1.5 * 0.10 = 0.25 (times KL on both sides): only 3.0 is at or above it.
    expected = torch.zeros(20)
    expected[-1] = 3.0
    torch.testing.assert_close(got, expected)


def test_scalars_and_empty_tensors():
    # One entry: it is its own median and quartiles, so it reaches the fence and is kept.
    assert merge("arcee_fusion", [torch.tensor(1.5)], torch.tensor(1.0)).item() == 1.5
    assert merge("arcee_fusion", [torch.zeros(3, 0)], torch.zeros(3, 0)).shape == (3, 0)


def test_importance_and_fence_written_a_second_way():
    from scipy.special import rel_entr, softmax

    base = randn(12, 40, seed=3)
    theta = base + 0.2 * randn(12, 40, seed=4)
    b, t = base.double().numpy(), theta.double().numpy()
    p, q = softmax(t, axis=-1) + 1e-8, softmax(b, axis=-1) + 1e-8
    importance = np.abs(t - b) * rel_entr(p, q).sum(-1, keepdims=True)
    np.testing.assert_allclose(fusion_importance(theta, base).numpy(), importance, rtol=1e-4, atol=1e-10)
    q1, med, q3 = np.percentile(importance, [25, 50, 75], method="lower")
    keep = importance >= med + 1.5 * (q3 - q1)
    got = merge("arcee_fusion", [theta], base).numpy()
    np.testing.assert_allclose(got, np.where(keep, t, b), rtol=1e-6, atol=1e-6)
    assert 0 < keep.mean() < 0.5


@pytest.mark.mergekit
@pytest.mark.parametrize("shape", [(64,), (16, 24), (3, 8, 10)])
def test_same_as_mergekit_function(shape):
    base = randn(*shape, seed=0) * 0.02
    theta = base + 0.003 * randn(*shape, seed=1)
    torch.testing.assert_close(merge("arcee_fusion", [theta], base), mergekit("arcee_fusion", [base, theta], 0),
                               rtol=0, atol=0)


@pytest.mark.mergekit
def test_mergekit_in_bfloat16_is_this_function_in_bfloat16():
    """MergeKit computes in the recipe's dtype: its bf16 result is this function evaluated in bf16."""
    base = (randn(64, 32, seed=0) * 0.02).bfloat16()
    theta = (base.float() + 0.002 * randn(64, 32, seed=1)).bfloat16()
    theirs = mergekit("arcee_fusion", [base, theta], 0)
    assert theirs.dtype == torch.float32  # MergeKit 0.1.5's float mask promotes its output
    ours_bf16 = arcee_fusion(theta[None], base, None, None, None)
    torch.testing.assert_close(ours_bf16, theirs.bfloat16(), rtol=0, atol=0)
    # In float32 (what mergelab computes in) the mask differs on a good share of entries.
    ours = merge("arcee_fusion", [theta.float()], base.float())
    assert float((ours.bfloat16() != theirs.bfloat16()).float().mean()) > 0.01


def test_big_tensors_sample_quartiles_reproducibly_and_close_to_exact():
    n = QUANTILE_SAMPLE + 200_000
    values = torch.rand(n, generator=torch.Generator().manual_seed(0))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = lower_quantiles(values, (0.25, 0.5, 0.75), g1)
    b = lower_quantiles(values, (0.25, 0.5, 0.75), g2)
    assert [float(x) for x in a] == [float(x) for x in b]
    for got, q in zip(a, (0.25, 0.5, 0.75)):  # uniform(0, 1): quantile q is q; sample error ~ 1e-3
        assert abs(float(got) - q) < 5e-3


@pytest.mark.mergekit
def test_whole_model_same_as_mergekit(llama_family, tmp_path):
    pytest.importorskip("mergekit", reason="mergekit is the reference (pip install mergelab[bench])")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    recipe = {"merge_method": "arcee_fusion", "base_model": str(llama_family["base"]), "dtype": "float32",
              "models": [{"model": str(llama_family["base"])}, {"model": str(llama_family["a"])}]}
    run_merge(MergeConfiguration.model_validate(recipe), str(tmp_path / "mk"),
              options=MergeOptions(copy_tokenizer=False, quiet=True))
    mergelab.merge(yaml.safe_dump(recipe), tmp_path / "ml", seed=0)
    theirs = load_file(str(tmp_path / "mk" / "model.safetensors"))
    ours = load_file(str(tmp_path / "ml" / "model.safetensors"))
    assert set(ours) == set(theirs)
    a = load_file(str(llama_family["a"] / "model.safetensors"))
    kept = 0
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=0, msg=lambda m: f"{k}: {m}")
        kept += int((ours[k] == a[k]).sum())
    assert kept > 0


def test_quantiles_by_selection_equal_the_sorted_entries():
    """lower_quantiles selects; the entries at floor(q (n - 1)) of a full sort are the definition."""
    from mergelab.methods.fusion import lower_quantiles

    g = torch.Generator().manual_seed(4)
    for n, dtype in [(1, torch.float32), (2, torch.float64), (3, torch.float32), (7, torch.bfloat16),
                     (1000, torch.float32), (4097, torch.float64), (4097, torch.bfloat16)]:
        values = (torch.randint(0, 5, (n,), generator=g).float() / 3).to(dtype)  # many ties
        ordered = torch.sort(values).values
        qs = (0.0, 0.25, 0.5, 0.75, 1.0)
        got = lower_quantiles(values, qs, None)
        assert [float(v) for v in got] == [float(ordered[int(q * (n - 1))]) for q in qs], n
