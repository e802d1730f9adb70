"""The search's cached candidate paths: the NaN check once per search, memory groups."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("numba")


def test_an_input_holding_nan_is_refused_once_with_its_name(tmp_path):
    from safetensors.torch import save_file

    from mergelab.errors import NonFiniteError
    from mergelab.search.candidate import merge_in_memory

    save_file({"w": torch.tensor([1.0, 2.0])}, str(tmp_path / "good.safetensors"))
    save_file({"w": torch.tensor([1.0, float("nan")])}, str(tmp_path / "bad.safetensors"))
    recipe = {"merge_method": "linear", "models": [{"model": str(tmp_path / "good.safetensors"),
                                                   "parameters": {"weight": 1.0}},
                                                  {"model": str(tmp_path / "bad.safetensors"),
                                                   "parameters": {"weight": 1.0}}]}
    with pytest.raises(NonFiniteError, match=r"input w \(.*bad\.safetensors\) holds NaN or Inf"):
        merge_in_memory(recipe)


def test_memory_groups_join_tensors_whose_memory_overlaps():
    from mergelab.search.fastpath import memory_groups

    buf = torch.zeros(100)
    other = torch.zeros(10)
    tensors = {"whole": buf, "head": buf[:10], "tail": buf[90:], "apart": other, "tied": other,
               "strided": torch.zeros(4, 6)[:, :3], "empty": torch.zeros(0), "fresh": torch.zeros(5)}
    g = memory_groups(tensors)
    assert g["whole"] == g["head"] == g["tail"]  # views inside one buffer
    assert g["apart"] == g["tied"] != g["whole"]  # the same storage twice (a tied lm_head)
    others = [g[n] for n in ("strided", "empty", "fresh")]
    assert len(set(others)) == 3 and not set(others) & {g["whole"], g["apart"]}
    halves = torch.zeros(20)
    assert len(set(memory_groups({"a": halves[:10], "b": halves[10:]}).values())) == 2  # adjacent, apart
