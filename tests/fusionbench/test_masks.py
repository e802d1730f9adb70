"""tall_masks and emr against fusion-bench 0.2.33 on a tiny model the test builds.

EMR: FusionBench's EMRMerging builds an EMRModulatedModel (backbone = base, unified task vector, one
modulator per task); mergelab's merged model must be base + its unified vector, and the model
mergelab.task_model rebuilds for task k the backbone after `set_task(k)` (FusionBench's modulator).
TALL masks: FusionBench's tall_mask.utils.generate_task_masks gives the masks; the rebuilt task models
must be base + tau_MTL * mask_t, the consensus merge base + tau_MTL * (count >= k) (utils'
construct_consensus_mask rule). FusionBench's TallMaskTaskArithmeticAlgorithm passes the base weights
to its mask function where theta_0's task vector (zeros) belongs and stops with a TypeError on modules:
pinned below, and its mask function called with zeros gives mergelab's masks.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging

import pytest
import torch
from torch import nn

import mergelab
from task_model_folders import SHAPES, recipe, save_folders, tiny_state_dicts

fb = pytest.importorskip("fusion_bench", reason="fusion-bench 0.2.33 is the reference")
from fusion_bench.method.emr_merging import EMRMerging  # noqa: E402
from fusion_bench.method.tall_mask import TallMaskTaskArithmeticAlgorithm  # noqa: E402
from fusion_bench.method.tall_mask.task_arithmetic import generate_task_masks as ta_task_masks  # noqa: E402
from fusion_bench.method.tall_mask.utils import generate_task_masks  # noqa: E402

ATOL = 1e-6  # float32 rounding of values of size ~3


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.l0, self.l1 = nn.Linear(8, 16), nn.Linear(16, 4)


def module(sd: dict) -> nn.Module:
    m = Tiny()
    m.load_state_dict(sd)
    return m


def pool(base: dict, fts: list[dict]):
    models = {"_pretrained_": module(copy.deepcopy(base))}
    models.update({f"task{i}": module(copy.deepcopy(sd)) for i, sd in enumerate(fts)})
    return fb.BaseModelPool(models)


def quiet(fn, *args):
    logging.getLogger("fusion_bench").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def assert_close(a: dict, b: dict, what: str) -> None:
    assert set(a) == set(b), what
    for k in a:
        diff = float((a[k].double() - b[k].double()).abs().max())
        assert diff <= ATOL, f"{what}: {k} differs by {diff:.3g}"


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    base, fts = tiny_state_dicts(3, seed=7)
    paths = save_folders(tmp_path_factory.mktemp("family"), base, fts)
    return base, fts, paths


def merged(family, tmp_path, method, **params):
    base, fts, (pb, pf) = family
    mergelab.merge(recipe(method, pb, pf, **params), tmp_path / method)
    return mergelab.checkpoint.tensor_file.load_tensors(tmp_path / method / "model.safetensors")


def test_emr_unified_model_and_every_task_model_match_fusionbench(family, tmp_path):
    base, fts, _ = family
    emr_model = quiet(EMRMerging().run, pool(base, fts))
    unified = {n: emr_model.unified_task_vector[n].detach() for n in SHAPES}
    ours = merged(family, tmp_path, "emr")
    assert_close(ours, {k: base[k] + unified[k] for k in SHAPES}, "emr unified model")
    for k in range(len(fts)):
        emr_model.set_task(f"task{k}")
        want = {n: t.detach().clone() for n, t in emr_model.backbone.state_dict().items()}
        assert_close(mergelab.task_model(tmp_path / "emr", f"task{k}"), want, f"emr task {k}")
        assert not torch.equal(want["l0.weight"], fts[k]["l0.weight"])  # a rebuilt model, not the fine-tune


def flat(sd: dict) -> torch.Tensor:
    return torch.cat([sd[k].reshape(-1) for k in SHAPES])


def unflat(v: torch.Tensor) -> dict:
    out, at = {}, 0
    for k, s in SHAPES.items():
        n = torch.Size(s).numel()
        out[k] = v[at:at + n].reshape(s)
        at += n
    return out


@pytest.mark.parametrize("k", [2, 1, 0])
def test_tall_masks_match_fusionbench_masks_and_consensus(family, tmp_path, k):
    base, fts, _ = family
    tvs = torch.stack([flat(ft) - flat(base) for ft in fts])
    masks = quiet(generate_task_masks, tvs, torch.stack([flat(ft) for ft in fts]), flat(base), None, 0.4)
    mtl = tvs.sum(0)
    consensus = masks.sum(0) >= k
    ours = merged(family, tmp_path, "tall_masks", tall_mask_lambda=0.4, prun_thre_k=k, **{"lambda": 0.7})
    assert_close(ours, unflat(flat(base) + 0.7 * mtl * consensus), "consensus merge")
    for t in range(len(fts)):
        want = unflat(flat(base) + mtl * masks[t])
        assert_close(mergelab.task_model(tmp_path / "tall_masks", t), want, f"tall task {t}")


def test_tall_masks_fusionbench_algorithm_and_its_mask_function(family, tmp_path):
    """TallMaskTaskArithmeticAlgorithm hands its mask function the pretrained weights where the function
    expects theta_0's task vector (zeros): on a pool of nn.Modules it stops with a TypeError (Parameter
    minus Tensor); called with zeros, that function gives mergelab's masks; with the weights, other ones."""
    base, fts, (pb, pf) = family
    with pytest.raises(TypeError, match="Tensor type mismatch"):
        quiet(TallMaskTaskArithmeticAlgorithm(tall_mask_lambda=0.6).run, pool(base, fts))
    mergelab.merge(recipe("tall_masks", pb, pf), tmp_path / "out")
    tvs = [{k: ft[k] - base[k] for k in SHAPES} for ft in fts]
    mtl = {k: sum(tv[k] for tv in tvs) for k in SHAPES}
    zeros = {k: torch.zeros_like(v) for k, v in base.items()}
    for t, tv in enumerate(tvs):
        masks = quiet(ta_task_masks, mtl, tv, zeros, 0.6)
        rebuilt = mergelab.task_model(tmp_path / "out", t)
        assert_close(rebuilt, {k: base[k] + masks[k] * mtl[k] for k in SHAPES}, f"task {t}")
        as_called = quiet(ta_task_masks, mtl, tv, base, 0.6)
        assert any(not torch.equal(as_called[k], masks[k]) for k in SHAPES)
