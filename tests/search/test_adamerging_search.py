"""AdaMerging (mergelab.search.adamerging): the objective falls, gradients match a hand formula and finite
differences, the written recipe merges to the functional model's exact weights, and an LM head works."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import mergelab
from mergelab.search.adamerging import MergedFunction, adamerging, entropy
from mergelab.search.adamerging.train import task_entropy
from mergelab.checkpoint.tensor_file import load_tensors, save_tensors
from adamerging_digits import digits_suite


def _summed_entropy(fn, lam, batches):
    params = fn.params(lam)
    return sum(task_entropy(fn, params, b[0]) for b in batches.values())


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_entropy_falls_on_digits(granularity):
    base, models, batches, tests = digits_suite()
    r = adamerging(base, models, batches, granularity=granularity, steps=150, lr=1e-2, seed=0)
    assert r.lambdas.shape == ((3,) if granularity == "task" else (3, 6))
    assert len(r.losses) == 151 and all(len(v) == 151 for v in r.task_losses.values())
    assert r.losses[-1] < 0.5 * r.losses[0]
    # the first value is the entropy at lambda = 0.3 (computed independently here)
    fn = MergedFunction(base, models, granularity=granularity)
    assert math.isclose(r.losses[0], float(_summed_entropy(fn, fn.init(0.3), {t: [b[0]] for t, b in
                                                                           _first_batches(batches, 0).items()})),
                        rel_tol=1e-5)


def _first_batches(batches, seed):
    """The batch each task draws first with `seed` (the order of mergelab.search.adamerging.train._BatchOrder)."""
    gen = torch.Generator().manual_seed(seed)
    return {t: [b[torch.randperm(len(b), generator=gen).tolist()[0]]] for t, b in batches.items()}


def _entropy_grad_dz(z):
    """d H / d z of the mean entropy (eps dropped): -p (log p - sum_j p_j log p_j) / N."""
    p = torch.softmax(z, -1)
    logp = torch.log(p)
    return -p * (logp - (p * logp).sum(-1, keepdim=True)) / len(z)


def test_gradients_match_the_hand_formula_for_a_linear_classifier():
    torch.manual_seed(0)
    base = nn.Linear(5, 4)
    models = [nn.Linear(5, 4) for _ in range(3)]
    x = torch.randn(7, 5)
    lam = torch.tensor([0.2, 0.5, -0.1])
    taus = [(m.weight.detach() - base.weight.detach(), m.bias.detach() - base.bias.detach()) for m in models]
    w = base.weight.detach() + sum(l * t[0] for l, t in zip(lam, taus))
    b = base.bias.detach() + sum(l * t[1] for l, t in zip(lam, taus))
    dz = _entropy_grad_dz(x @ w.T + b)  # (N, C)
    hand_w = torch.stack([(dz * (x @ tw.T)).sum() for tw, _ in taus])
    hand_b = torch.stack([(dz * tb).sum() for _, tb in taus])
    for granularity, want in (("task", hand_w + hand_b), ("layer", torch.stack([hand_w, hand_b], 1))):
        fn = MergedFunction(base, models, granularity=granularity)
        l = (lam if granularity == "task" else lam[:, None].expand(3, 2)).clone().requires_grad_(True)
        task_entropy(fn, fn.params(l), x).backward()
        torch.testing.assert_close(l.grad, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_gradients_match_finite_differences_on_the_digits_mlps(granularity):
    base, models, batches, _ = digits_suite()
    data = {t: [b[0].double()] for t, b in batches.items()}
    fn = MergedFunction(base, models, granularity=granularity)  # in float64 below, for finite differences
    fn.base = {n: t.double() for n, t in fn.base.items()}
    fn.task_vectors = [{n: t.double() for n, t in tv.items()} for tv in fn.task_vectors]
    lam = torch.rand(fn.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    lam.requires_grad_(True)
    _summed_entropy(fn, lam, data).backward()
    h = 1e-6
    flat = lam.detach().reshape(-1)
    for i in range(0, flat.numel(), max(1, flat.numel() // 6)):
        up, down = flat.clone(), flat.clone()
        up[i] += h
        down[i] -= h
        fd = (_summed_entropy(fn, up.view(fn.shape), data) - _summed_entropy(fn, down.view(fn.shape), data))
        assert math.isclose(float(fd) / (2 * h), float(lam.grad.reshape(-1)[i]), rel_tol=1e-5, abs_tol=1e-9)


def _save(tmp_path, name, module):
    path = tmp_path / f"{name}.safetensors"
    save_tensors(path, {k: v.contiguous() for k, v in module.state_dict().items()})
    return str(path)


class _BNNet(nn.Module):
    """Names where substring filters could go wrong (0.weight / 10.weight) and a buffer (BatchNorm)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(6, 6) for _ in range(11)])
        self.norm = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.norm(self.layers(x)))


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_the_recipe_merges_to_the_functional_model(tmp_path, granularity):
    torch.manual_seed(0)
    base = _BNNet()
    base.eval()
    models = []
    for k in range(3):
        m = _BNNet()
        m.load_state_dict({n: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
                           for n, v in base.state_dict().items()})
        models.append(m)
    data = [[torch.randn(16, 6, generator=torch.Generator().manual_seed(k))] for k in range(3)]
    r = adamerging(base, models, data, granularity=granularity, steps=30, lr=5e-2)
    assert r.lambdas.unique().numel() > 1  # distinct learned values, so a mix-up would show
    recipe = r.recipe(_save(tmp_path, "base", base), [_save(tmp_path, f"m{k}", m) for k, m in enumerate(models)])
    assert recipe["merge_method"] == "task_arithmetic"
    assert isinstance(recipe["models"][0]["parameters"]["weight"], list)  # the BatchNorm buffers stay the base's
    mergelab.merge(recipe, tmp_path / "out")
    merged = load_tensors(tmp_path / "out" / "model.safetensors")
    fn = MergedFunction(base, models, granularity=granularity)
    want = {**{n: t for n, t in base.state_dict().items()}, **fn.params(r.lambdas)}
    assert set(merged) == set(want)
    for n, t in want.items():
        assert torch.equal(merged[n], t.detach()), n


def test_task_wise_recipe_without_buffers_is_one_weight_per_model(tmp_path):
    base, models, batches, _ = digits_suite()
    r = adamerging(base, models, batches, steps=5, lr=1e-2, show_progress=True)  # the bar runs
    recipe = r.recipe("base", ["a", "b", "c"])
    assert [m["parameters"]["weight"] for m in recipe["models"]] == r.lambdas.tolist()
    assert recipe["parameters"] == {"lambda": 1.0, "normalize": False}


def _tiny_gpt2(seed):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def _lm_family():
    base = _tiny_gpt2(0)
    models = []
    for k in range(2):
        m = _tiny_gpt2(0)
        g = torch.Generator().manual_seed(10 + k)
        m.load_state_dict({n: v + 0.3 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                           for n, v in base.state_dict().items()})
        models.append(m)
    ids = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    return base, models, [[{"input_ids": ids, "attention_mask": mask}], [{"input_ids": ids.flip(1)}]]


def test_lm_head_entropy_is_the_mean_over_next_token_distributions():
    base, models, data = _lm_family()
    fn = MergedFunction(base, models)
    assert "lm_head.weight" in fn.aliases()  # tied to the embeddings, merged with them
    lam = torch.tensor([0.3, 0.6])
    batch = data[0][0]
    merged = _tiny_gpt2(0)
    params = {n: t.detach() for n, t in fn.params(lam).items()}
    merged.load_state_dict({**base.state_dict(), **params, "lm_head.weight": params["transformer.wte.weight"]})
    merged.eval()
    with torch.no_grad():
        logits = merged(**batch).logits
    p = torch.softmax(logits, -1)
    h = -(p * torch.log(p + 1e-8)).sum(-1)  # (batch, seq)
    want = h[batch["attention_mask"].bool()].mean()
    got = task_entropy(fn, fn.params(lam), batch)
    assert math.isclose(float(got), float(want), rel_tol=1e-5)


def test_lm_head_adamerging_lowers_entropy_and_round_trips(tmp_path):
    base, models, data = _lm_family()
    r = adamerging(base, models, data, granularity="layer", steps=25, lr=5e-2)
    assert r.losses[-1] < r.losses[0]
    paths = []
    for name, m in (("base", base), ("a", models[0]), ("b", models[1])):
        m.save_pretrained(tmp_path / name)
        paths.append(str(tmp_path / name))
    mergelab.merge(r.recipe(paths[0], paths[1:]), tmp_path / "out")
    merged = load_tensors(tmp_path / "out" / "model.safetensors")
    fn = MergedFunction(base, models, granularity="layer")
    for n, t in fn.params(r.lambdas).items():
        assert torch.equal(merged[n], t.detach()), n


def test_entropy_is_fusionbench_formula_and_checks_shape():
    logits = torch.tensor([[0.0, 0.0], [10.0, -10.0]])
    want = (math.log(2) + 0.0) / 2
    assert math.isclose(float(entropy(logits)), want, abs_tol=1e-6)
    with pytest.raises(mergelab.MergeError, match="logits"):
        entropy(torch.zeros(2, 3, 4))


def test_errors_name_what_is_wrong():
    base, models, batches, _ = digits_suite()
    with pytest.raises(mergelab.MergeError, match="2 tasks but there are 3"):
        adamerging(base, models, list(batches.values())[:2], steps=1)
    with pytest.raises(mergelab.MergeError, match="granularity"):
        adamerging(base, models, batches, granularity="block", steps=1)


def test_task_heads_over_a_merged_encoder_match_a_hand_computation():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
    models = [nn.Sequential(nn.Linear(6, 8), nn.Tanh()) for _ in range(2)]
    heads = {"a": nn.Linear(8, 3), "b": nn.Linear(8, 5)}
    x = {"a": torch.randn(10, 6), "b": torch.randn(10, 6)}
    r = adamerging(encoder, models, {t: [v] for t, v in x.items()}, steps=0,
                   heads={t: (lambda out, batch, h=h: h(out)) for t, h in heads.items()})
    fn = MergedFunction(encoder, models)
    params = fn.params(torch.tensor([0.3, 0.3]))
    merged = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
    merged.load_state_dict({n: t.detach() for n, t in params.items()})
    with torch.no_grad():
        want = sum(float(entropy(heads[t](merged(x[t])))) for t in x)
    assert math.isclose(r.losses[0], want, rel_tol=1e-6)
    with pytest.raises(mergelab.MergeError, match="heads names tasks"):
        adamerging(encoder, models, {t: [v] for t, v in x.items()}, heads={"c": heads["a"]}, steps=0)
