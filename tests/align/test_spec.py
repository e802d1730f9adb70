"""Permutation specs: derived from fx traces and HF configs; bad input gives one clear MergeError."""

from __future__ import annotations

import pytest
import torch
from align_models import MLP, ResNetish, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn

import mergelab.align as al
from mergelab.errors import MergeError, ShapeMismatch


def test_permute_axis_hand_worked():
    t = torch.arange(12).reshape(2, 6)  # axis 1: 3 units of width 2
    out = al.permute_axis(t, 1, torch.tensor([2, 0, 1]))
    assert out.tolist() == [[4, 5, 0, 1, 2, 3], [10, 11, 6, 7, 8, 9]]
    # q|k|v layout: 2 chunks of 2 units of width 1
    v = torch.tensor([10, 11, 20, 21])
    assert al.permute_axis(v, 0, torch.tensor([1, 0]), chunks=2).tolist() == [11, 10, 21, 20]


def test_mlp_spec_hand_written():
    spec = al.spec_from_module(MLP(d_in=3, width=5, depth=2, classes=2))
    assert spec.groups == {"P_layers.0": 5, "P_layers.1": 5}
    a0, a1 = al.Axis("P_layers.0"), al.Axis("P_layers.1")
    assert spec.axes == {"layers.0.weight": (a0, None), "layers.0.bias": (a0,),
                         "layers.1.weight": (a1, a0), "layers.1.bias": (a1,),
                         "head.weight": (None, a1), "head.bias": (None,)}


def test_resnet_spec_residual_shares_a_group_and_flatten_reads_channels():
    spec = al.spec_from_module(ResNetish(w=6))
    stem = spec.axes["stem.0.weight"][0].group
    # the residual addition ties the block's output (bn2) to the stem's channels
    assert spec.axes["bn2.weight"][0].group == stem
    assert spec.axes["conv2.weight"][0].group == stem
    assert spec.axes["conv1.weight"][1].group == stem
    assert spec.axes["conv1.weight"][0].group != stem  # the block's inner channels are free
    assert spec.axes["fc.weight"] == (None, al.Axis(spec.axes["down.weight"][0].group))
    assert spec.axes["bn1.num_batches_tracked"] == ()
    assert len(spec.groups) == 3


def test_hf_specs_heads_and_residual():
    llama = al.spec_for(tiny_llama(0))
    assert llama.groups["heads.0"] == 2  # GQA: two kv heads, each with its two query heads
    assert llama.groups["residual"] == 32 and llama.groups["mlp.1"] == 48
    assert llama.axes["model.layers.0.self_attn.q_proj.weight"] == (al.Axis("heads.0"), al.Axis("residual"))
    assert llama.axes["lm_head.weight"] == (None, al.Axis("residual"))
    gpt2 = al.spec_for(tiny_gpt2(0))
    assert gpt2.axes["transformer.h.1.attn.c_attn.weight"] == (al.Axis("residual"), al.Axis("heads.1", 3))
    assert gpt2.axes["transformer.h.0.mlp.c_fc.weight"] == (al.Axis("residual"), al.Axis("mlp.0"))
    bert = al.spec_for(tiny_bert(0))
    assert bert.axes["bert.encoder.layer.1.attention.output.dense.weight"] == (al.Axis("residual"),
                                                                               al.Axis("heads.1"))
    assert bert.taps["mlp.0"] == [("bert.encoder.layer.0.output.dense", "in")]


def test_bare_encoder_keeps_its_output_basis():
    import transformers as tf

    model = tf.BertModel(tiny_bert(0).config)
    assert "residual" not in al.spec_for(model).groups


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            return self.fc(x)
        return x


class _Cat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(6, 2)

    def forward(self, x):
        return self.out(torch.cat([self.a(x), self.b(x)], dim=1))


def test_untraceable_architectures_name_the_module():
    with pytest.raises(MergeError, match="_Branchy"):
        al.spec_from_module(_Branchy())
    with pytest.raises(MergeError, match=r"node 'cat'"):
        al.spec_from_module(_Cat())
    with pytest.raises(MergeError, match="grouped convolution"):
        al.spec_from_module(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.LazyLinear(2)))


def test_different_widths_and_names_are_refused():
    a, b = MLP(width=16), MLP(width=24)
    with pytest.raises(ShapeMismatch, match=r"layers\.0\.weight.*equal widths"):
        al.align(a, b)
    sd_b = {("renamed." + k if k.startswith("head") else k): v for k, v in MLP().state_dict().items()}
    with pytest.raises(MergeError, match=r"model B does not fit.*renamed\.head"):
        al.align(a, sd_b, spec=al.spec_from_module(a))
    with pytest.raises(MergeError, match="state dict needs a PermutationSpec"):
        al.align(a.state_dict(), MLP().state_dict())


def test_unsupported_hf_parts_are_named():
    cfg = {"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2, "intermediate_size": 16}
    with pytest.raises(MergeError, match=r"model\.layers\.0\.mlp\.experts\.0\.w1\.weight"):
        al.spec_for_hf(cfg, {"model.layers.0.mlp.experts.0.w1.weight": (16, 8)})
    with pytest.raises(MergeError, match="model_type 't5'"):
        al.spec_for_hf({"model_type": "t5"}, {})
