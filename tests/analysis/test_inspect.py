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

from mergelab.analysis.inspect import inspect_models, recommend, render_inspect, tensor_kind
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
    assert rec[0].startswith("linear (or slerp") and "--base" in rec[1]


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
