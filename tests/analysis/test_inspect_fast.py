"""inspect's compiled path (methods/kernels/geometry.py, inspect.tensor_sums) against float64 numpy, statistic by statistic.

Every expected number here is computed directly from its definition in numpy
(float64 sums of the float32 task vectors tau_i = w_i - r, r the base or the
float32 mean), not through the module's own helpers; only the sample positions
(`sample_index`, a definition: seeded positions) and the spectral sub-grid rows
are shared. Inputs have masses of exact ties (values on a coarse grid) and exact
zeros (a model equal to the base there), in float32 and bfloat16.
"""

from __future__ import annotations

import contextlib
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mergelab.analysis import geometry, inspect
from mergelab.methods.kernels import geometry as geometry_kernel
from mergelab.analysis.geometry import MASS_DENSITIES, sample_index
from mergelab.analysis.inspect import inspect_models, tensor_sums
from mergelab.methods.kernels import kernels_disabled


def coarse_family(n: int, shape: tuple[int, ...], dtype: torch.dtype, seed: int):
    """A base and n models base + 0.25 * k, k in {-2..2}, zero at 30% of entries: ties and zeros galore."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(dtype)
    steps = torch.randint(-2, 3, (n, *shape), generator=g) * (torch.rand(n, *shape, generator=g) < 0.7)
    return base, [(base.float() + 0.25 * steps[i]).to(dtype) for i in range(n)]


def kth_largest(x: np.ndarray, k: int) -> float:
    return float(np.sort(x)[::-1][k - 1])


def keep(share: float, m: int) -> int:
    # floor(share * m), at least 1; shares here (0.1, 0.2, 0.25, 0.5) are exact in binary times m
    return max(1, math.floor(share * m + 1e-9))


def numpy_reference(weights, reference, density: float) -> dict:
    """Every statistic of one tensor name from its definition, float64 (see the module docstring)."""
    w32 = np.stack([t.float().reshape(-1).numpy() for t in weights])  # (N, m) float32
    r32 = reference.float().reshape(-1).numpy() if reference is not None else \
        w32.sum(0, dtype=np.float32) / np.float32(len(weights))  # sequential float32 sum, as the kernels
    if reference is None and len(weights) > 2:  # the kernels add the models one after the other
        acc = w32[0].copy()
        for row in w32[1:]:
            acc = acc + row
        r32 = acc / np.float32(len(weights))
    d32 = w32 - r32  # float32 subtraction, the definition of tau
    d, w, r = d32.astype(np.float64), w32.astype(np.float64), r32.astype(np.float64)
    n, m = d.shape
    sample = sample_index(m) if m > geometry.EXACT_TOPK_MAX_NUMEL else np.arange(m)
    mags = np.abs(d[:, sample])
    threshold = np.array([kth_largest(mags[i], keep(density, len(sample))) for i in range(n)])
    shares = {dd: np.array([np.sort(mags[i])[::-1][:keep(dd, len(sample))].sum() / mags[i].sum() for i in range(n)])
              for dd in MASS_DENSITIES}

    def counts(x):
        nonzero = (x != 0).sum(0)
        conflict = (nonzero >= 2) & (x > 0).any(0) & (x < 0).any(0)
        chance = sum(float((nonzero == k).sum()) * (1 - 2.0 ** (1 - k)) for k in range(2, n + 1))
        return [int(conflict.sum()), int((nonzero >= 2).sum()), chance]

    trimmed = np.where(np.abs(d) >= threshold[:, None], d, 0.0)
    mass = np.abs(d).sum(1)
    return {"weight_gram": w @ w.T, "task_gram": d @ d.T, "ref_sq": float(r @ r), "mass_total": mass,
            "mass_kept": {dd: shares[dd] * mass for dd in MASS_DENSITIES}, "conflicts": counts(d),
            "trimmed": counts(trimmed), "threshold": threshold}


def assert_sums_match(sums, want):
    np.testing.assert_allclose(sums.weight_gram.numpy(), want["weight_gram"], rtol=1e-12)
    np.testing.assert_allclose(sums.task_gram.numpy(), want["task_gram"], rtol=1e-12, atol=1e-12)
    assert sums.ref_sq == pytest.approx(want["ref_sq"], rel=1e-12)
    np.testing.assert_allclose(sums.mass_total.numpy(), want["mass_total"], rtol=1e-12)
    for dd in MASS_DENSITIES:
        np.testing.assert_allclose(sums.mass_kept[dd].numpy(), want["mass_kept"][dd], rtol=1e-6)
    for key in ("conflicts", "trimmed"):
        got = getattr(sums, key)
        assert got[:2] == want[key][:2], key
        assert got[2] == pytest.approx(want[key][2], rel=1e-12), key


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("threads", [0, 2])
def test_every_statistic_matches_numpy(n, dtype, with_base, threads, monkeypatch):
    # A small block size puts several blocks (summed in block order) in a 5,000-entry tensor.
    monkeypatch.setattr(geometry_kernel, "BLOCK", 1024)
    base, weights = coarse_family(n, (50, 100), dtype, seed=10 * n + with_base)
    reference = base if with_base else None
    want = numpy_reference(weights, reference, 0.25)
    with ThreadPoolExecutor(threads) if threads else _null() as pool:
        sums = tensor_sums(weights, reference, 0.25, spectral=False, pool=pool)
    assert_sums_match(sums, want)
    # The case is not trivial: conflicts exist and the trim removes contested coordinates.
    assert want["conflicts"][0] > 0 and want["trimmed"][1] < want["conflicts"][1]
    # Ties (float32 on a 0.25 grid): many entries equal the threshold, so keeping all of them or only
    # keep_count of them would give different trimmed counts.
    if with_base and dtype == torch.float32:
        d = np.abs(np.stack([w.numpy().reshape(-1) for w in weights]) - base.numpy().reshape(-1))
        assert ((d == want["threshold"][:, None]).sum(1) > 10).all()


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampled_threshold_of_a_big_tensor_matches_numpy(dtype, monkeypatch):
    monkeypatch.setattr(geometry, "EXACT_TOPK_MAX_NUMEL", 2000)
    monkeypatch.setattr(geometry, "SAMPLE_SIZE", 1500)
    monkeypatch.setattr(inspect, "EXACT_TOPK_MAX_NUMEL", 2000)
    base, weights = coarse_family(2, (80, 90), dtype, seed=3)
    want = numpy_reference(weights, base, 0.2)
    assert_sums_match(tensor_sums(weights, base, 0.2, spectral=False), want)


def test_pool_and_block_split_do_not_change_a_bit(monkeypatch):
    base, weights = coarse_family(3, (120, 70), torch.bfloat16, seed=5)
    one = tensor_sums(weights, base, 0.2, spectral=True)
    with ThreadPoolExecutor(3) as pool:
        many = tensor_sums(weights, base, 0.2, spectral=True, pool=pool)
    for key in ("weight_gram", "task_gram", "mass_total"):
        assert torch.equal(getattr(one, key), getattr(many, key)), key
    assert one.conflicts == many.conflicts and one.trimmed == many.trimmed
    # The SVDs are LAPACK's, whose last bits may depend on its thread count.
    torch.testing.assert_close(one.overlap_sum, many.overlap_sum, rtol=0, atol=1e-6)


def numpy_top_overlap(mats: np.ndarray, k: int = geometry.SPECTRAL_RANK) -> np.ndarray:
    # One BLAS thread: on a loaded 2-core machine OpenBLAS's threads spend seconds spinning on these sizes.
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    with threadpool_limits(1) if threadpool_limits is not None else contextlib.nullcontext():
        bases = [np.linalg.svd(m.astype(np.float64), full_matrices=False)[0][:, :k] for m in mats]
    return np.array([[np.sum((a.T @ b) ** 2) / k for b in bases] for a in bases])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(40, 30), (300, 280), (1030, 270)])
def test_spectral_overlap_matches_numpy_svd_on_the_subgrid(dtype, shape):
    """Low-rank task matrices (rank 12 with a clear gap after the 8th value) plus small noise; shapes that are
    compared whole, through the randomized SVD (min side > 256) and on the sub-grid (> 512)."""
    g = torch.Generator().manual_seed(shape[0])
    rows, cols = shape
    base = torch.randn(shape, generator=g)
    shared = torch.randn(rows, 4, generator=g)
    scales = torch.tensor([40.0, 30, 25, 20, 16, 14, 12, 10, 1, 1, 1, 1])
    weights = []
    for _ in range(3):
        left = torch.cat([shared, torch.randn(rows, 8, generator=g)], 1)
        tau = (left * scales) @ torch.randn(12, cols, generator=g) / math.sqrt(rows * cols)
        weights.append((base + tau + 1e-4 * torch.randn(shape, generator=g)).to(dtype))
    base = base.to(dtype)
    sums = tensor_sums(weights, base, 0.2, spectral=True)
    ri = geometry.even_indices(rows, geometry.SPECTRAL_MAX_DIM).numpy()
    ci = geometry.even_indices(cols, geometry.SPECTRAL_MAX_DIM).numpy()
    w = np.stack([t.float().numpy()[ri][:, ci] for t in weights])
    tau = (w - base.float().numpy()[ri][:, ci]).astype(np.float64)
    np.testing.assert_allclose(sums.overlap_sum.numpy(), numpy_top_overlap(tau), atol=2e-3)
    assert sums.overlap_count.min() == 1
    assert sums.chance_sum[0, 1] == pytest.approx(8 / len(ri))


def _write(folder, tensors):
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    return folder


def test_memory_mapped_files_and_state_dicts_give_one_report(tmp_path, monkeypatch):
    """Checkpoints stream through engine.run (observe jobs); in-memory dicts are read as they are."""
    plans = []
    real_run = inspect.run

    def counting_run(plan, sink, observe, **kw):
        plans.append(plan)
        return real_run(plan, sink, observe, **kw)

    monkeypatch.setattr(inspect, "run", counting_run)
    g = torch.Generator().manual_seed(9)
    shapes = {f"model.layers.{i}.mlp.up_proj.weight": (24, 16) for i in range(4)}
    shapes.update({f"model.layers.{i}.input_layernorm.weight": (16,) for i in range(4)})
    base = {k: torch.randn(s, generator=g).bfloat16() for k, s in shapes.items()}
    models = [{k: (v.float() + 0.1 * torch.randn(v.shape, generator=g)).bfloat16() for k, v in base.items()}
              for _ in range(2)]
    paths = [_write(tmp_path / f"m{i}", m) for i, m in enumerate(models)]
    from_files = inspect_models(paths, _write(tmp_path / "base", base)).to_dict()
    from_dicts = inspect_models(models, base).to_dict()
    assert len(plans) == 1 and {j.op for j in plans[0].jobs} == {"observe"}  # the files' run, not the dicts'
    assert sorted(j.name for j in plans[0].jobs) == sorted(shapes) and len(plans[0].checkpoints) == 3
    for report in (from_files, from_dicts):
        report.pop("models"), report.pop("base")
    assert from_files == from_dicts
    with kernels_disabled():
        slow = inspect_models(models, base).to_dict()
    slow.pop("models"), slow.pop("base")
    assert slow["overall"]["sign_conflict_trimmed"] == pytest.approx(from_files["overall"]["sign_conflict_trimmed"])
    assert slow["overall"]["task_cosine"][0][1] == pytest.approx(from_files["overall"]["task_cosine"][0][1],
                                                                 rel=1e-9)


def test_workers_leave_the_callers_thread_count_alone():
    before = torch.get_num_threads()
    with inspect._workers() as pool:
        if pool is not None:
            assert pool.submit(torch.get_num_threads).result() == 1
    assert torch.get_num_threads() == before


def test_a_file_changed_while_the_workers_computed_is_refused(tmp_path, monkeypatch):
    """Small names are computed on worker threads after the engine's own unchanged check: inspect checks
    the files once more when every sum is in, so a file rewritten meanwhile is an error, not a report."""
    from mergelab.errors import CheckpointError

    g = torch.Generator().manual_seed(3)
    models = [{f"model.layers.{i}.mlp.up_proj.weight": torch.randn(8, 4, generator=g) for i in range(2)}
              for _ in range(2)]
    paths = [_write(tmp_path / f"m{i}", m) for i, m in enumerate(models)]
    real_run = inspect.run

    def run_then_rewrite(plan, sink, observe, **kw):
        report = real_run(plan, sink, observe, **kw)
        save_file({k: v + 1 for k, v in models[1].items()}, str(paths[1] / "model.safetensors"))
        return report

    monkeypatch.setattr(inspect, "run", run_then_rewrite)
    with pytest.raises(CheckpointError):
        inspect_models(paths)
