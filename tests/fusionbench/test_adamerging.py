"""AdaMerging against FusionBench 0.2.33's functional merged models (TaskWiseMergedModel,
LayerWiseMergedModel) and its entropy_loss: same gradients and the same Adam trajectory of lambda
for the same batches, on models built here. FusionBench's algorithm classes need its model pools and
data loaders; the loop below is its test_time_adaptation (one batch per task per step, each task's
entropy back-propagated, one Adam step, re-merge)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("fusion_bench")
from fusion_bench.method.adamerging.entropy_loss import entropy_loss  # noqa: E402
from fusion_bench.models.wrappers.layer_wise_fusion import LayerWiseMergedModel  # noqa: E402
from fusion_bench.models.wrappers.task_wise_fusion import TaskWiseMergedModel  # noqa: E402

from mergelab.search.adamerging import MergedFunction, adamerging  # noqa: E402
from mergelab.search.adamerging.entropy import prediction_rows  # noqa: E402
from mergelab.search.adamerging.train import task_entropy  # noqa: E402


def _mlp_family(k=3, seed=0):
    torch.manual_seed(seed)
    make = lambda: nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 5))  # noqa: E731
    base = make()
    models = []
    for i in range(k):
        m = make()
        g = torch.Generator().manual_seed(seed + 10 + i)
        m.load_state_dict({n: v + 0.4 * torch.randn(v.shape, generator=g) for n, v in base.state_dict().items()})
        models.append(m)
    data = [[torch.randn(12, 8, generator=torch.Generator().manual_seed(100 + i))] for i in range(k)]
    return base, models, data


def _fusionbench(granularity, base, models, init, clamp):
    n_params = len([p for p in base.parameters() if p.requires_grad])
    cls, shape = ((TaskWiseMergedModel, (len(models),)) if granularity == "task"
                  else (LayerWiseMergedModel, (len(models), n_params)))
    return cls(torch.full(shape, init), copy.deepcopy(base), [copy.deepcopy(m) for m in models],
               clamp_weights=clamp, tie_weights=True, strict=False)


def _fb_logits(module, batch):
    out = module(**batch) if isinstance(batch, dict) else module(batch)
    return getattr(out, "logits", out)


def _fb_adamerging(module, data, steps, lr):
    """FusionBench's test_time_adaptation loop, with one fixed batch per task."""
    opt = torch.optim.Adam([module.merge_weight], lr=lr)
    module.merge_weights()
    for _ in range(steps):
        for batches in data:
            batch = batches[0]
            loss = entropy_loss(prediction_rows(_fb_logits(module, batch), batch))
            loss.backward(retain_graph=True)
        opt.step()
        opt.zero_grad()
        module.merge_weights()
    return module


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_gradient_equals_fusionbench(granularity):
    base, models, data = _mlp_family()
    fb = _fusionbench(granularity, base, models, 0.3, clamp=False)
    fb.merge_weights()
    fb_loss = sum(entropy_loss(fb(b[0])) for b in data)
    fb_loss.backward()
    fn = MergedFunction(base, models, granularity=granularity)
    lam = fn.init(0.3).requires_grad_(True)
    params = fn.params(lam)
    ours = sum(task_entropy(fn, params, b[0]) for b in data)
    ours.backward()
    torch.testing.assert_close(ours, fb_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lam.grad, fb.merge_weight.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("granularity,clamp", [("task", False), ("layer", False), ("task", True), ("layer", True)])
def test_adam_trajectory_equals_fusionbench(granularity, clamp):
    base, models, data = _mlp_family()
    steps, lr = 20, 5e-2
    fb = _fb_adamerging(_fusionbench(granularity, base, models, 0.3, clamp), data, steps, lr)
    r = adamerging(base, models, data, granularity=granularity, steps=steps, lr=lr, init=0.3, clamp=clamp)
    fb_lam = fb.merge_weight.detach().clamp(0, 1) if clamp else fb.merge_weight.detach()
    assert (r.lambdas - 0.3).abs().max() > 0.1  # it moved
    torch.testing.assert_close(r.lambdas, fb_lam, rtol=1e-4, atol=1e-5)
    merged = fb.merge_and_unload().state_dict()
    fn = MergedFunction(base, models, granularity=granularity)
    for n, t in fn.params(r.lambdas).items():
        torch.testing.assert_close(t.detach(), merged[n], rtol=1e-4, atol=1e-5)


def _gpt2_family(tied):
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2(seed):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=40, n_positions=16,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                          tie_word_embeddings=tied))

    base = gpt2(0)
    models = []
    for i in range(2):
        m = gpt2(0)
        g = torch.Generator().manual_seed(7 + i)
        m.load_state_dict({n: v + 0.3 * torch.randn(v.shape, generator=g) for n, v in base.state_dict().items()})
        models.append(m)
    ids = torch.randint(0, 40, (3, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    data = [[{"input_ids": ids, "attention_mask": mask}], [{"input_ids": ids.flip(1), "attention_mask": mask}]]
    return base.eval(), models, data


def test_layer_wise_lm_head_equals_fusionbench():
    base, models, data = _gpt2_family(tied=False)
    fb = _fusionbench("layer", base, models, 0.3, clamp=False).eval()
    fb = _fb_adamerging(fb, data, 5, 1e-2)
    r = adamerging(base, models, data, granularity="layer", steps=5, lr=1e-2)
    torch.testing.assert_close(r.lambdas, fb.merge_weight.detach(), rtol=1e-4, atol=1e-5)


def test_tied_lm_head_is_where_fusionbench_stops():
    """With the LM head tied to the embeddings FusionBench's wrapper passes both tensors to functional_call,
    which refuses them (tie_weights=True; with tie_weights=False the head would stay the base's). mergelab
    merges the shared tensor once, and the head follows it, as in the saved model (one tensor)."""
    base, models, data = _gpt2_family(tied=True)
    fb = _fusionbench("layer", base, models, 0.3, clamp=False)
    with pytest.raises(ValueError, match="tied"):
        fb.merge_weights()
        fb(**data[0][0])
    r = adamerging(base, models, data, granularity="layer", steps=2, lr=1e-2)
    assert "lm_head.weight" not in r.names and r.aliases == {"lm_head.weight": "transformer.wte.weight"}
