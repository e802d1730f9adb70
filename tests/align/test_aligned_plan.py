"""Writing an aligned checkpoint streams through the engine: permute jobs give apply_permutations' tensors."""

from __future__ import annotations

import torch
from align_models import MLP
from safetensors.torch import save_file

import mergelab.align as al
from mergelab.align.files import aligned_plan
from mergelab.checkpoint.reader import Checkpoint
from mergelab.engine import MemorySink, run


def test_aligned_plan_matches_apply_permutations(tmp_path):
    torch.manual_seed(0)
    model = MLP()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state["head.weight"] = state["head.weight"].half()  # dtypes are kept
    save_file(state, str(tmp_path / "b.safetensors"))
    spec = al.spec_for(model)
    perms = al.random_perms(spec, torch.Generator().manual_seed(1))
    with Checkpoint(tmp_path / "b.safetensors") as ck:
        plan = aligned_plan(ck, spec, perms)
        assert {j.name: j.op for j in plan.jobs}["head.bias"] == "copy"  # no permuted axis
        assert {j.name: j.op for j in plan.jobs}["layers.1.weight"] == "permute"
        out = {k: torch.zeros_like(v) for k, v in state.items()}
        run(plan, MemorySink(out))
    want = al.apply_permutations(spec, state, perms)
    assert list(out) == list(want)
    for k, v in want.items():
        assert out[k].dtype == v.dtype and torch.equal(out[k], v), k
