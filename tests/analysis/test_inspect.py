"""inspect_models on checkpoints written here: numbers against numpy, recommendations, errors."""

from __future__ import annotations

import json
import weakref
from collections.abc import Mapping

import numpy as np
import pytest
import torch
from rich.console import Console
from safetensors.torch import save_file

from mergelab.analysis.inspect import inspect_models, tensor_kind
from mergelab.analysis.recommend import recommend
from mergelab.cli.tables import render_inspect
from mergelab.errors import ShapeMismatch

LAYERS = 2


def shapes() -> dict[str, tuple[int, ...]]:
    out = {"model.embed_tokens.weight": (24, 16), "model.norm.weight": (16,)}
    for i in range(LAYERS):
        out[f"model.layers.{i}.self_attn.q_proj.weight"] = (16, 16)
        out[f"model.layers.{i}.mlp.up_proj.weight"] = (32, 16)
        out[f"model.layers.{i}.input_layernorm.weight"] = (16,)
    return out


def write(folder, tensors: dict[str, torch.Tensor]):
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    return folder


def family(tmp_path, make_tau, n=2, seed=0):
    """A base and n fine-tunes base + make_tau(i, name, shape, generator); returns (base path, model paths, sds)."""
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in shapes().items()}
    models = [{k: base[k] + make_tau(i, k, base[k].shape, g) for k in base} for i in range(n)]
    paths = [write(tmp_path / f"ft{i}", m) for i, m in enumerate(models)]
    return write(tmp_path / "base", base), paths, base, models


def independent(i, name, shape, g):
    return 0.1 * torch.randn(shape, generator=g)


def test_numbers_match_numpy_on_concatenated_task_vectors(tmp_path):
    base_path, paths, base, models = family(tmp_path, independent, n=3)
    report = inspect_models(paths, base_path, density=0.25)
    deltas = np.stack([np.concatenate([(m[k] - base[k]).reshape(-1).numpy() for k in base]) for m in models])
    norms = np.linalg.norm(deltas, axis=1)
    np.testing.assert_allclose(report.overall.task_norm, norms, rtol=1e-5)
    np.testing.assert_allclose(np.array(report.overall.task_cosine), deltas @ deltas.T / np.outer(norms, norms),
                               atol=1e-5)
    signs = np.sign(deltas)
    contested = (signs != 0).sum(0) >= 2
    conflict = contested & (signs > 0).any(0) & (signs < 0).any(0)
    assert report.overall.sign_conflict == pytest.approx(conflict.sum() / contested.sum())
    # Trimmed: keep each task vector's top 25% magnitudes per tensor, then count the same way.
    trimmed = []
    for m in models:
        parts = []
        for k in base:
            d = (m[k] - base[k]).reshape(-1).numpy()
            keep = np.argsort(-np.abs(d), kind="stable")[: int(0.25 * d.size) or 1]
            parts.append(np.where(np.isin(np.arange(d.size), keep), d, 0.0))
        trimmed.append(np.concatenate(parts))
    signs = np.sign(np.stack(trimmed))
    contested = (signs != 0).sum(0) >= 2
    conflict = contested & (signs > 0).any(0) & (signs < 0).any(0)
    assert report.overall.sign_conflict_trimmed == pytest.approx(conflict.sum() / contested.sum())
    # A layer's numbers are those of its own tensors only.
    layer1 = next(g for g in report.groups if g.name == "layer 1")
    names = [k for k in base if ".layers.1." in k]
    d1 = np.stack([np.concatenate([(m[k] - base[k]).reshape(-1).numpy() for k in names]) for m in models])
    assert layer1.task_cosine[0][2] == pytest.approx(
        d1[0] @ d1[2] / np.linalg.norm(d1[0]) / np.linalg.norm(d1[2]), abs=1e-5)
    assert [g.name for g in report.groups] == ["layer 0", "layer 1", "model.embed_tokens.weight", "model.norm.weight"]
    assert set(report.kinds) == {"attention", "mlp", "embedding", "norm"}
    json.dumps(report.to_dict(), allow_nan=False)


def test_recommendation_follows_planted_correlation(tmp_path):
    common = {}

    def correlated(i, name, shape, g):
        if name not in common:
            common[name] = 0.1 * torch.randn(shape, generator=g)
        return common[name] + 0.01 * torch.randn(shape, generator=g)

    base_path, paths, *_ = family(tmp_path / "corr", correlated)
    rec = recommend(inspect_models(paths, base_path))
    assert rec[0].startswith("linear:") and not any(r.startswith("ties") for r in rec)

    base_path, paths, *_ = family(tmp_path / "indep", independent)
    report = inspect_models(paths, base_path)
    rec = recommend(report)
    assert rec[0].startswith("ties or dare_ties:") and not any(r.startswith("linear") for r in rec)
    assert report.kinds["mlp"].trimmed_conflict_ratio > 0.5


def test_recommendation_follows_planted_subspaces(tmp_path):
    left = {}

    def shared_subspace(i, name, shape, g):
        if len(shape) != 2:
            return 0.1 * torch.randn(shape, generator=g)
        if name not in left:
            left[name] = torch.randn(shape[0], 3, generator=g)
        return 0.1 * left[name] @ torch.randn(3, shape[1], generator=g)  # same column space, other coefficients

    def own_subspace(i, name, shape, g):
        if len(shape) != 2:
            return 0.1 * torch.randn(shape, generator=g)
        return 0.1 * torch.randn(shape[0], 3, generator=g) @ torch.randn(3, shape[1], generator=g)

    base_path, paths, *_ = family(tmp_path / "shared", shared_subspace)
    shared = recommend(inspect_models(paths, base_path))
    base_path, paths, *_ = family(tmp_path / "own", own_subspace)
    own = recommend(inspect_models(paths, base_path))
    assert any(r.startswith("tsv or iso_cts") for r in shared) and not any(r.startswith("task_arithmetic") for r in shared)
    assert any(r.startswith("task_arithmetic") for r in own) and not any(r.startswith("tsv") for r in own)


def test_without_base_task_vectors_are_deviations_from_the_mean(tmp_path):
    _, paths, *_ = family(tmp_path, independent)
    report = inspect_models(paths)
    assert report.reference == "mean"
    assert report.overall.task_cosine[0][1] == pytest.approx(-1.0, abs=1e-6)  # two deviations are opposite
    rec = recommend(report)
    assert rec[0].startswith("linear (or slerp") and "give base= (the model they were fine-tuned from)" in rec[1]
    from mergelab.cli.flags import with_flags

    assert with_flags(rec[1]).endswith("(on the command line: --base)")  # as the inspect command shows it


def test_different_shapes_are_a_clear_error(tmp_path):
    base_path, paths, base, models = family(tmp_path, independent)
    models[1]["model.layers.0.mlp.up_proj.weight"] = torch.zeros(33, 16)
    write(paths[1], models[1])
    with pytest.raises(ShapeMismatch, match=r"model.layers.0.mlp.up_proj.weight has shape \(33, 16\).*\(32, 16\)"):
        inspect_models(paths, base_path)


def test_partial_and_integer_tensors_are_reported_not_dropped(tmp_path):
    base_path, paths, base, models = family(tmp_path, independent)
    extra = dict(models[0], **{"extra.weight": torch.ones(3), "steps": torch.tensor([1, 2])})
    write(paths[0], extra)
    write(paths[1], dict(models[1], steps=torch.tensor([1, 2])))
    write(base_path, dict(base, steps=torch.tensor([1, 2])))
    report = inspect_models(paths, base_path)
    reasons = {s["tensor"]: s["reason"] for s in report.skipped}
    assert "absent from" in reasons["extra.weight"] and "not floating point" in reasons["steps"]
    assert report.overall.n_tensors == len(shapes())


def test_render_shows_every_group_and_the_recommendation(tmp_path):
    base_path, paths, *_ = family(tmp_path, independent)
    report = inspect_models(paths, base_path)
    per_group, pairs, advice = render_inspect(report)
    assert per_group.row_count == len(report.groups) + len(report.kinds) + 1
    assert pairs.row_count == 1 and advice.row_count == len(recommend(report))
    console = Console(record=True, width=300)
    console.print(pairs)
    assert f"{report.overall.task_cosine[0][1]:.3f}" in console.export_text()


class LiveCounting(Mapping):
    """Tensors made on each read; counts how many of them are alive at once, across all instances."""

    alive = 0
    peak = 0

    def __init__(self, seed: int):
        self.seed = seed

    def __getitem__(self, name):
        t = torch.randn(shapes()[name], generator=torch.Generator().manual_seed(self.seed + hash(name) % 1000))
        LiveCounting.alive += 1
        LiveCounting.peak = max(LiveCounting.peak, LiveCounting.alive)
        weakref.finalize(t, LiveCounting._release)
        return t

    @staticmethod
    def _release():
        LiveCounting.alive -= 1

    def __iter__(self):
        return iter(shapes())

    def __len__(self):
        return len(shapes())


def test_streams_one_tensor_name_at_a_time():
    report = inspect_models([LiveCounting(1), LiveCounting(2), LiveCounting(3)], LiveCounting(0))
    assert report.overall.n_tensors == len(shapes())
    assert LiveCounting.peak <= 4  # three models and the base, one tensor each


@pytest.mark.parametrize("name, kind", [
    ("model.layers.3.self_attn.k_proj.weight", "attention"), ("transformer.h.0.attn.c_attn.weight", "attention"),
    ("model.layers.3.mlp.down_proj.weight", "mlp"), ("transformer.h.0.mlp.c_fc.weight", "mlp"),
    ("model.layers.3.post_attention_layernorm.weight", "norm"), ("transformer.ln_f.bias", "norm"),
    ("model.embed_tokens.weight", "embedding"), ("lm_head.weight", "embedding"), ("score.weight", "other"),
])
def test_tensor_kind(name, kind):
    assert tensor_kind(name) == kind


def test_hugging_face_folders(llama_family):
    report = inspect_models([llama_family["a"], llama_family["b"], llama_family["c"]], llama_family["base"])
    assert [g.name for g in report.groups] == ["layer 0", "layer 1", "layer 2", "layer 3", "lm_head.weight",
                                               "model.embed_tokens.weight", "model.norm.weight"]
    assert set(report.kinds) == {"attention", "mlp", "embedding", "norm"}
    # The fixture adds independent noise to every tensor: nearly orthogonal task vectors, random signs.
    assert abs(report.overall.mean_task_cosine) < 0.1
    assert report.kinds["mlp"].trimmed_conflict_ratio == pytest.approx(1.0, abs=0.15)
    assert recommend(report)[0].startswith("ties or dare_ties")


# ----------------------------------------------------------------------------- the compiled pass


def numpy_sums(w: np.ndarray, ref: np.ndarray, threshold: np.ndarray) -> dict:
    """Every sum of one tensor name, written directly in numpy (float64), for w (N, m) and ref (m,)."""
    d = (w.astype(np.float32) - ref.astype(np.float32)).astype(np.float64)

    def counts(x):
        m = (x != 0).sum(0)
        both = (x > 0).any(0) & (x < 0).any(0)
        chance = sum((m == k).sum() * (1 - 2.0 ** (1 - k)) for k in range(2, x.shape[0] + 1))
        return [int((both & (m >= 2)).sum()), int((m >= 2).sum()), chance]

    trimmed = np.where(np.abs(d) >= threshold[:, None], d, 0.0)
    return {"weight_gram": w.astype(np.float64) @ w.astype(np.float64).T, "task_gram": d @ d.T,
            "ref_sq": float((ref.astype(np.float64) ** 2).sum()), "mass_total": np.abs(d).sum(1),
            "conflicts": counts(d), "trimmed": counts(trimmed)}


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_base", [True, False])
def test_compiled_pass_matches_numpy_with_ties_and_zeros(n, dtype, with_base):
    from mergelab.methods.kernels import geometry as geometry_kernel

    g = torch.Generator().manual_seed(n)
    base = torch.randn(3001, generator=g).to(dtype)
    # Coarse steps make many exact ties and zero task-vector entries (a model equal to the base there).
    steps = torch.randint(-2, 3, (n, 3001), generator=g) * (torch.rand(n, 3001, generator=g) < 0.7)
    weights = [(base.float() + 0.25 * steps[i]).to(dtype) for i in range(n)]
    threshold = torch.tensor([0.25, 0.5, 0.3][:n])
    ref = base if with_base else None
    got = geometry_kernel.geometry_pass(weights, ref, threshold)
    w = torch.stack(weights).float().numpy()
    ref_np = base.float().numpy() if with_base else torch.stack(weights).float().mean(0).numpy()
    want = numpy_sums(w, ref_np, threshold.numpy())
    for key in ("weight_gram", "task_gram", "mass_total"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, err_msg=key)
    assert got["ref_sq"] == pytest.approx(want["ref_sq"], rel=1e-6)
    for key in ("conflicts", "trimmed"):
        assert got[key][:2] == want[key][:2] and got[key][2] == pytest.approx(want[key][2]), key
    assert want["conflicts"][0] > 0 and want["trimmed"][1] < want["conflicts"][1]  # the case is not trivial


def test_compiled_and_reference_reports_agree(tmp_path):
    from mergelab.methods.kernels import kernels_disabled

    base_path, paths, _, _ = family(tmp_path, independent, n=3)
    fast = inspect_models(paths, base_path).to_dict()
    with kernels_disabled():
        slow = inspect_models(paths, base_path).to_dict()

    def close(a, b, where="report"):
        if isinstance(a, dict):
            assert a.keys() == b.keys(), where
            for k in a:
                close(a[k], b[k], f"{where}.{k}")
        elif isinstance(a, list):
            assert len(a) == len(b), where
            for i, (x, y) in enumerate(zip(a, b)):
                close(x, y, f"{where}[{i}]")
        elif isinstance(a, float):
            assert a == pytest.approx(b, rel=1e-5, abs=1e-7), where
        else:
            assert a == b, where

    close(fast, slow)


def test_bfloat16_checkpoints_against_numpy(tmp_path):
    """Norms, cosines, kept masses and conflicts of bf16 files, without a base (deviations from the mean)."""
    g = torch.Generator().manual_seed(7)
    names = {"model.layers.0.mlp.up_proj.weight": (64, 48), "model.layers.1.mlp.up_proj.weight": (64, 48),
             "model.norm.weight": (48,)}
    base = {k: torch.randn(s, generator=g) for k, s in names.items()}
    models = [{k: (v + 0.05 * torch.randn(v.shape, generator=g)).bfloat16() for k, v in base.items()}
              for _ in range(3)]
    paths = [write(tmp_path / f"m{i}", m) for i, m in enumerate(models)]
    report = inspect_models(paths, density=0.3)
    w = {k: np.stack([m[k].float().reshape(-1).numpy() for m in models]) for k in names}
    d = {k: w[k] - w[k].astype(np.float32).sum(0, dtype=np.float32) / np.float32(3) for k in names}
    flat_w = np.concatenate([w[k] for k in names], 1).astype(np.float64)
    flat_d = np.concatenate([d[k] for k in names], 1).astype(np.float64)
    o = report.overall
    np.testing.assert_allclose(o.weight_norm, np.linalg.norm(flat_w, axis=1), rtol=1e-6)
    np.testing.assert_allclose(o.task_norm, np.linalg.norm(flat_d, axis=1), rtol=1e-5)
    wn = np.linalg.norm(flat_w, axis=1)
    np.testing.assert_allclose(np.array(o.weight_cosine), flat_w @ flat_w.T / np.outer(wn, wn), atol=1e-6)
    mean = np.concatenate([w[k].mean(0) for k in names]).astype(np.float64)
    assert o.reference_norm == pytest.approx(np.linalg.norm(mean), rel=1e-5)
    # Share of each task vector's L1 mass in its top-d magnitudes, per tensor, summed over tensors.
    for density in ("0.1", "0.5"):
        kept = sum(np.sort(np.abs(d[k]), axis=1)[:, ::-1][:, :max(1, int(float(density) * d[k].shape[1]))]
                   .sum(1) for k in names)
        np.testing.assert_allclose(o.mass_kept[density], kept / np.abs(flat_d).sum(1), rtol=1e-5)
    signs = np.sign(flat_d)
    contested = (signs != 0).sum(0) >= 2
    assert o.sign_conflict == pytest.approx(((signs > 0).any(0) & (signs < 0).any(0) & contested).sum()
                                            / contested.sum())


@pytest.mark.parametrize("layers, expected", [(None, [0, 1, 2, 3, 4]), (2, [0, 4]), (3, [0, 2, 4]), (0, [])])
def test_spectral_overlap_on_a_sample_of_layers(tmp_path, layers, expected):
    g = torch.Generator().manual_seed(1)
    base = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(12, 8, generator=g) for i in range(5)}
    base["lm_head.weight"] = torch.randn(10, 8, generator=g)
    models = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    report = inspect_models(models, base, spectral_layers=layers)
    with_overlap = [int(gr.name.split()[1]) for gr in report.groups
                    if gr.name.startswith("layer") and gr.spectral_overlap is not None]
    assert with_overlap == expected
    head = next(gr for gr in report.groups if gr.name == "lm_head.weight")
    assert head.spectral_overlap is not None  # tensors outside the layers are always measured
    assert report.to_dict()["spectral_layers"] == layers
