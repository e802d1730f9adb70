"""regmean_plusplus against FusionBench 0.2.33's RegMeanAlgorithmPlusPlus on a small model built here.

FusionBench's generic class leaves the model-specific hooks abstract; its only concrete
subclass is CLIP's. The test subclasses the generic class with hooks for the small model
below, written like CLIP's (embeddings = every tensor before the blocks, averaged; blocks =
the ModuleList ``layers``) and takes the Gram hook itself from FusionBench's CLIP class
(``get_regmean_weights``, with a stand-in for its Lightning Fabric that only places modules).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

fb_pp = pytest.importorskip("fusion_bench.method.regmean_plusplus")
from fusion_bench.modelpool import BaseModelPool  # noqa: E402

import mergelab  # noqa: E402
from mergelab.stats.gram_sequential import regmean_plusplus_stats  # noqa: E402

RATIO = 0.95  # FusionBench's reduce_non_diagonal_ratio in its CLIP configuration = mergelab's alpha


class Block(nn.Module):
    """A pre-norm residual MLP block with two linear paths (like attention's projections)."""

    def __init__(self, d: int):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)
        self.gate = nn.Linear(d, d)

    def forward(self, h):
        u = self.ln(h)
        return h + self.fc2(torch.nn.functional.gelu(self.fc1(u))) * torch.sigmoid(self.gate(u))


class Net(nn.Module):
    def __init__(self, seed: int, d: int = 6):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(5, d)
        self.pre_norm = nn.LayerNorm(d)
        self.layers = nn.ModuleList([Block(d) for _ in range(3)])
        self.post_norm = nn.LayerNorm(d)
        with torch.no_grad():
            for p in self.parameters():
                p.add_(0.1 * torch.randn_like(p))

    def embeddings(self, x):
        return self.pre_norm(self.embed(x))

    def forward(self, x):
        h = self.embeddings(x)
        for block in self.layers:
            h = block(h)
        return self.post_norm(h)


class _Fabric:
    @staticmethod
    def setup(module):
        return module


class Pool(BaseModelPool):
    def __init__(self, models, data):
        super().__init__(models)
        self._data = data

    def load_train_dataset(self, name, *args, **kwargs):
        return self._data[name]


class NetRegMeanPlusPlus(fb_pp.RegMeanAlgorithmPlusPlus):
    """FusionBench's generic RegMean++ with the hooks of Net (modelled on its CLIP subclass)."""

    fabric = _Fabric()
    get_regmean_weights = fb_pp.RegMeanAlgorithmForCLIPPlusPlus.get_regmean_weights

    def merge_embedding_layer(self, models_to_merge_dict):
        sds = [m.state_dict() for m in models_to_merge_dict.values()]
        return {k: torch.stack([sd[k] for sd in sds]).mean(0) for k in sds[0]
                if k.startswith(("embed.", "pre_norm."))}

    def get_input_for_first_layer(self, model, train_dataset):
        return [model.embeddings(batch).detach() for batch in train_dataset]

    def get_layers(self, model):
        return model.layers

    def update_merged_params_dict(self, merged_params_dict, new_merged_params, layer_idx):
        merged_params_dict.update({f"layers.{layer_idx}.{k}": v for k, v in new_merged_params.items()})
        return merged_params_dict

    def layer_batches_forward(self, layer, batches_input):
        return [layer(b).detach() for b in batches_input]


def _inputs():
    pretrained, tasks = Net(0), {"a": Net(1), "b": Net(2), "c": Net(3)}
    g = torch.Generator().manual_seed(7)
    data = {n: [torch.randn(4, 3, 5, generator=g) * (1 + i) for _ in range(2)] for i, n in enumerate(tasks)}
    return pretrained, tasks, data


def test_same_tensors_as_fusionbench_regmean_plusplus():
    pretrained, tasks, data = _inputs()
    pool = Pool({"_pretrained_": copy.deepcopy(pretrained), **{n: copy.deepcopy(m) for n, m in tasks.items()}},
                data)
    algo = NetRegMeanPlusPlus(num_regmean_examples=1000, exclude_param_names_regex=[],
                              reduce_non_diagonal_ratio=RATIO, weight_transpose=True)
    fb = algo.run(pool).state_dict()
    res = regmean_plusplus_stats(list(tasks.values()), [data[n] for n in tasks], alpha=RATIO)
    ours = res.state_dict
    for k in ours:
        if k.startswith("post_norm."):
            # FusionBench leaves tensors after the blocks at the pretrained value; mergelab averages them
            torch.testing.assert_close(fb[k], pretrained.state_dict()[k])
            mean = torch.stack([m.state_dict()[k] for m in tasks.values()]).mean(0)
            torch.testing.assert_close(ours[k], mean)
            continue
        torch.testing.assert_close(ours[k], fb[k], rtol=1e-4, atol=1e-5, msg=k)
    # RegMean++ is not RegMean here: the last block's merged weights move
    plain = mergelab.merge_state_dicts("regmean", list(tasks.values()), alpha=RATIO,
                                       stats=[mergelab.stats.gram_matrices(m, data[n]) for n, m in tasks.items()])
    assert (plain["layers.2.fc2.weight"] - ours["layers.2.fc2.weight"]).abs().max() > 1e-3
