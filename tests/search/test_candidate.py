"""In-memory candidates give the tensors `mergelab merge` writes, bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mergelab
from mergelab.engine import items as engine_items
from mergelab.errors import MergeError
from mergelab.search.candidate import CheckpointCache, merge_in_memory
from mergelab.search.fastpath import CandidateWriter, SearchCache

from conftest import write_llama_family


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    return write_llama_family(tmp_path_factory.mktemp("fam"), names=("base", "a", "b"), dtype=torch.bfloat16,
                              tie_word_embeddings=True)


def _written(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _recipe(method: str, p: dict[str, Path]) -> dict:
    params = {"linear": {"weight": 0.3}, "task_arithmetic": {"weight": 0.7},
              "ties": {"weight": 0.8, "density": [0.2, 0.9]}, "dare_ties": {"weight": 1.0, "density": 0.4}}[method]
    rec = {"merge_method": method,
           "models": [{"model": str(p["a"]), "parameters": params},
                      {"model": str(p["b"]), "parameters": {**params, "weight": 0.5}}]}
    if method != "linear":
        rec["base_model"] = str(p["base"])
    return rec


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_ties"])
def test_in_memory_equals_written_merge_bit_for_bit(family, tmp_path, monkeypatch, method):
    # Small chunks: big tensors are merged in row chunks, each with its own generator key.
    monkeypatch.setattr(engine_items, "CHUNK_ELEMENTS", 1024)
    recipe = _recipe(method, family)
    mergelab.merge(recipe, tmp_path / "out", seed=7)
    written = _written(tmp_path / "out")
    in_memory = merge_in_memory(recipe, seed=7)
    assert set(in_memory) == set(written)
    for name, t in written.items():
        assert in_memory[name].dtype == t.dtype
        assert torch.equal(in_memory[name].view(torch.int16), t.view(torch.int16)), name
    # Another seed changes DARE's masks: the seed really reaches the method.
    if method == "dare_ties":
        other = merge_in_memory(recipe, seed=8)
        assert any(not torch.equal(other[n], written[n]) for n in written)


# Candidates of one search: parameters change from one to the next (the repeated one is skipped).
_SEQUENCES = {
    "linear": [({"weight": 0.3}, {"weight": 0.5}, {}), ({"weight": 1.0}, {"weight": 1.0}, {}),
               ({"weight": 1.0}, {"weight": 1.0}, {}), ({"weight": 0.2}, {"weight": -0.1}, {"normalize": False})],
    "task_arithmetic": [({"weight": 0.3}, {"weight": 0.5}, {}), ({"weight": [0.1, 0.9]}, {"weight": 0.5}, {"lambda": 0.6}),
                        ({"weight": [0.1, 0.9]}, {"weight": 0.5}, {"lambda": 0.6}),
                        ({"weight": 0.7}, {"weight": -0.2}, {"normalize": True})],
    "ties": [({"weight": 0.8, "density": [0.2, 0.9]}, {"weight": 0.5, "density": 0.4}, {}),
             ({"weight": 0.8, "density": 0.5}, {"weight": 0.5, "density": 0.4}, {}),  # only a's density moves
             ({"weight": 1.0, "density": 0.05}, {"weight": 1.0, "density": 1.0}, {"normalize": False, "lambda": 0.7}),
             ({"weight": 1.0, "density": 0.05}, {"weight": 1.0, "density": 1.0}, {"normalize": False, "lambda": 0.7})],
}


@pytest.mark.parametrize("method,budget", [("linear", None), ("task_arithmetic", None), ("ties", None), ("ties", 0)])
def test_cached_candidates_equal_written_merges_as_parameters_change(family, tmp_path, monkeypatch, method, budget):
    tk = pytest.importorskip("mergelab.methods.kernels.ties")
    # `mergelab merge` runs TIES tensors of 2048 entries or more through the compiled kernel (the
    # embedding and the MLP matrices of the tiny family) and the smaller ones through the readable
    # reference; the cached path runs the kernel's into() on all of them, and must match both.
    # bfloat16 task vectors are full of tied magnitudes: the tie cut-offs are exercised.
    monkeypatch.setattr(tk, "MIN_KERNEL_NUMEL", 2048)
    writer, cache, sink = CandidateWriter(SearchCache(budget)), CheckpointCache(), None
    sequence = _SEQUENCES[method] if budget is None else _SEQUENCES[method][2:4]
    for i, (pa, pb, shared) in enumerate(sequence):
        recipe = {"merge_method": method, "parameters": shared,
                  "models": [{"model": str(family["a"]), "parameters": pa},
                             {"model": str(family["b"]), "parameters": pb}]}
        if method != "linear":
            recipe["base_model"] = str(family["base"])
        mergelab.merge(recipe, tmp_path / f"out{i}", seed=7)
        written = _written(tmp_path / f"out{i}")
        sink = sink or {n: torch.full_like(t, float("nan")) for n, t in written.items()}
        merge_in_memory(recipe, sink, seed=7, cache=cache, writer=writer)
        for name, t in written.items():
            assert torch.equal(sink[name].view(torch.int16), t.view(torch.int16)), (i, name)
    cache.close()
    n = len(sink)
    assert writer.counts["skipped"] >= n  # the repeated candidate wrote nothing
    indexed = writer.cache.stats.indexes
    if method == "ties" and budget == 0:
        assert indexed == 0 and writer.cache.stats.over_budget > 0 and writer.counts["fast"] == 0
    elif method == "ties":
        assert writer.counts["fast"] >= 3 * n and writer.counts["engine"] == 0  # 3 candidates not skipped
        assert 0 < indexed <= 2 * n  # one index per task vector that was trimmed, built once
    else:
        assert writer.counts["fast"] >= 3 * n and writer.counts["engine"] == 0 and indexed == 0


def test_merge_into_a_module_writes_its_parameters(family, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = _recipe("ties", family)
    mergelab.merge(recipe, tmp_path / "out", seed=0)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    module = AutoModelForCausalLM.from_pretrained(family["base"], dtype=torch.bfloat16)
    cache = CheckpointCache()
    merge_in_memory(recipe, module, seed=0, cache=cache)
    merge_in_memory(recipe, module, seed=0, cache=cache)  # a second candidate reuses the opened inputs
    cache.close()
    got, want = module.state_dict(), loaded.state_dict()
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    # The tied lm_head shares the embedding's storage, so it was written too.
    assert module.lm_head.weight.data_ptr() == module.model.embed_tokens.weight.data_ptr()


def test_a_model_of_another_shape_is_refused(family):
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config

    wrong = LlamaForCausalLM(tiny_llama_config(hidden_size=16, intermediate_size=32, tie_word_embeddings=True))
    with pytest.raises(MergeError, match="shape"):
        merge_in_memory(_recipe("linear", family), wrong)


def _tied(n: int, models: int, dtype: torch.dtype, seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Task vectors taking a handful of values: most magnitudes are tied with thousands of others."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randint(-8, 9, (n,), generator=g).float() / 16).to(dtype)
    xs = [(base.float() + torch.randint(-3, 4, (n,), generator=g).float() / 32).to(dtype) for _ in range(models)]
    return xs, base


def test_cached_candidates_with_tied_magnitudes_equal_merge_written_files(tmp_path):
    """Through CandidateWriter and one cache, a sequence of densities equals `mergelab merge`'s files."""
    pytest.importorskip("numba")
    from safetensors.torch import save_file

    from mergelab.methods import PerModel
    from mergelab.methods.sparsify import TaskVectorParams, TiesShared

    n = 1 << 17  # the engine's compiled kernel runs from 2^17 entries on (methods/kernels/ties.py)
    xs, base = _tied(n, 2, torch.bfloat16, seed=4)
    paths = {}
    for name, t in {"base": base, "a": xs[0], "b": xs[1]}.items():
        paths[name] = tmp_path / f"{name}.safetensors"
        save_file({"w": t.reshape(256, 512), "small": t[:64].clone()}, str(paths[name]))
    writer, cache, sink = CandidateWriter(SearchCache()), CheckpointCache(), None
    for i, (da, db, wb) in enumerate([(0.5, 0.5, 1.0), (0.37, 0.5, 1.0), (0.37, 0.81, 0.3), (0.02, 1.0, 0.3)]):
        recipe = {"merge_method": "ties", "base_model": str(paths["base"]),
                  "models": [{"model": str(paths["a"]), "parameters": {"weight": 1.0, "density": da}},
                             {"model": str(paths["b"]), "parameters": {"weight": wb, "density": db}}]}
        mergelab.merge(recipe, tmp_path / f"out{i}", seed=0)
        written = load_file(str(next((tmp_path / f"out{i}").glob("*.safetensors"))))
        sink = sink or {k: torch.full_like(v, float("nan")) for k, v in written.items()}
        merge_in_memory(recipe, sink, cache=cache, writer=writer)
        for k, v in written.items():
            assert torch.equal(sink[k].view(torch.int16), v.view(torch.int16)), (i, k)
    cache.close()
    # `mergelab merge` runs the compiled kernel on "w" (2^17 entries: the kernel's lower bound
    # today) and the readable reference on "small"; the cached path runs the kernel's into() on both.
    from mergelab.methods import get_method
    from mergelab.methods.kernels import kernels_enabled

    p = PerModel([TaskVectorParams(weight=1.0, density=0.5)] * 2)
    w = [t.reshape(256, 512) for t in (*xs, base)]
    if kernels_enabled() and get_method("ties").kernel.supports(w[:2], w[2], p, TiesShared()):
        # Both tensors through the kernel's into(), "small" too (where merge ran the reference on it).
        assert writer.counts["fast"] == 8 and writer.counts["engine"] == 0
        assert writer.cache.stats.indexes == 4  # one order per task vector and tensor, built once
    else:
        assert writer.counts["fast"] == 0 and writer.counts["engine"] == 8
