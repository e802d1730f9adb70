"""magmax and wudi against hand-worked cases and a second formula; both through a recipe merge end to end."""

import pytest
import torch
from safetensors.torch import load_file

import mergelab
from method_helpers import merge, randn
from mergelab.methods.wudi import interference
from task_model_folders import recipe, save_folders, tiny_state_dicts


def test_magmax_by_hand_with_ties_going_to_the_later_model():
    base = torch.tensor([1.0, 0.0, 2.0, -1.0])
    taus = torch.tensor([[0.5, -2.0, 0.0, 0.3],
                         [-0.5, 1.0, 0.0, -0.4],
                         [0.1, 1.5, 0.0, 0.4]])
    # entry 0: |0.5| = |-0.5| tie -> model 1's -0.5; entry 1: -2.0; entry 2: all zero; entry 3: 0.4 tie -> model 2
    expected = base + 0.5 * torch.tensor([-0.5, -2.0, 0.0, 0.4])
    got = merge("magmax", base + taus, base=base)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(merge("magmax", base + taus, base=base, **{"lambda": 1.0}),
                               base + torch.tensor([-0.5, -2.0, 0.0, 0.4]), rtol=0, atol=1e-7)


def test_magmax_equals_an_argmax_formula():
    base, x = randn(64, 32, seed=1), randn(4, 64, 32, seed=2)
    taus = x - base
    # No ties in continuous noise: the argmax of |tau| picks the same entry as the >= fold.
    pick = taus.abs().argmax(0, keepdim=True)
    expected = base + 0.7 * taus.gather(0, pick)[0]
    torch.testing.assert_close(merge("magmax", x, base=base, **{"lambda": 0.7}), expected, rtol=0, atol=1e-6)


def test_magmax_with_one_model_is_task_arithmetic():
    base, x = randn(10, seed=3), randn(1, 10, seed=4)
    torch.testing.assert_close(merge("magmax", x, base=base, **{"lambda": 0.5}), base + 0.5 * (x[0] - base))


def _wudi_by_hand(taus: torch.Tensor, iterations: int, lr: float) -> torch.Tensor:
    """Adam written out (beta 0.9, 0.999, eps 1e-8) on the gradient of the loss in closed form.

    d/dtau sum_i ||(tau - tau_i) tau_i^T||^2 / n_i = sum_i 2 (tau - tau_i) tau_i^T tau_i / n_i.
    """
    t = taus.double()
    n = t.reshape(len(t), -1).square().sum(1).view(-1, 1, 1)
    tau = t.sum(0)
    m = torch.zeros_like(tau)
    v = torch.zeros_like(tau)
    for k in range(1, iterations + 1):
        grad = (2 * torch.matmul(tau.unsqueeze(0) - t, t.transpose(1, 2)) @ t / n).sum(0)
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad * grad
        m_hat, v_hat = m / (1 - 0.9 ** k), v / (1 - 0.999 ** k)
        tau = tau - lr * m_hat / (v_hat.sqrt() + 1e-8)
    return tau


def test_wudi_equals_adam_written_out_and_lowers_the_interference():
    base, x = randn(12, 6, seed=5), randn(3, 12, 6, seed=6)
    taus = x - base
    got = merge("wudi", x, base=base, iterations=40, lr=1e-2, **{"lambda": 1.0})
    expected = base.double() + _wudi_by_hand(taus, 40, 1e-2)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=2e-5)
    n = taus.reshape(3, -1).square().sum(1)
    assert interference(got - base, taus, n) < 0.85 * interference(taus.sum(0), taus, n)  # 357 -> 283 here


def test_wudi_lambda_scales_and_other_tensors_take_the_mean():
    base, x = randn(12, 6, seed=7), randn(3, 12, 6, seed=8)
    one = merge("wudi", x, base=base, iterations=5, lr=1e-3)
    half = merge("wudi", x, base=base, iterations=5, lr=1e-3, **{"lambda": 0.5})
    torch.testing.assert_close(half - base, 0.5 * (one - base), rtol=0, atol=1e-6)
    b1, x1 = randn(9, seed=9), randn(3, 9, seed=10)
    torch.testing.assert_close(merge("wudi", x1, base=b1), b1 + (x1 - b1).mean(0), rtol=0, atol=1e-6)
    # zero iterations: the starting point, the sum of the task vectors
    torch.testing.assert_close(merge("wudi", x, base=base, iterations=0), base + (x - base).sum(0), rtol=0, atol=1e-6)


@pytest.mark.parametrize("method, params", [("magmax", {"lambda": 0.5}), ("wudi", {"iterations": 10})])
def test_recipe_merge_matches_merge_state_dicts(tmp_path, method, params):
    base, fts = tiny_state_dicts(3, seed=11)
    pb, pf = save_folders(tmp_path / "in", base, fts)
    mergelab.merge(recipe(method, pb, pf, **params), tmp_path / "out", show_progress=False)
    written = load_file(str(next((tmp_path / "out").glob("*.safetensors"))))
    direct = mergelab.merge_state_dicts(method, fts, base=base, **params)
    assert set(written) == set(direct)
    for name in direct:
        torch.testing.assert_close(written[name], direct[name], rtol=0, atol=0, msg=name)


def test_unknown_parameter_is_refused_naming_it(tmp_path):
    base, fts = tiny_state_dicts(2, seed=12)
    pb, pf = save_folders(tmp_path / "in", base, fts)
    with pytest.raises(mergelab.RecipeError, match="parameters.bogus is not a parameter of magmax"):
        mergelab.merge(recipe("magmax", pb, pf, bogus=5), tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()


def test_wudi_gram_form_of_the_loss_equals_the_product_form():
    taus = randn(3, 50, 8, seed=13, dtype=torch.float64)
    tau = randn(50, 8, seed=14, dtype=torch.float64)
    n = taus.reshape(3, -1).square().sum(1)
    direct = interference(tau, taus, n)
    torch.testing.assert_close(interference(tau, taus, n, taus.transpose(1, 2) @ taus), direct, rtol=1e-12, atol=0)
    # a tall tensor merged through the method equals Adam written out on the same loss
    base, x = randn(40, 5, seed=15), randn(3, 40, 5, seed=16)
    got = merge("wudi", x, base=base, iterations=15, lr=1e-2)
    torch.testing.assert_close(got.double(), base.double() + _wudi_by_hand(x - base, 15, 1e-2), rtol=0, atol=2e-5)


@pytest.mark.parametrize("n_models", [1, 2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_magmax_kernel_gives_the_reference_bits(n_models, dtype):
    pytest.importorskip("numba")
    from mergelab.methods import PerModel, get_method, run_method
    from mergelab.methods.kernels import kernels_disabled

    spec = get_method("magmax")
    gen = torch.Generator().manual_seed(n_models)
    # a coarse grid: many exact ties between models, so the later-model rule is exercised
    base = (torch.randint(-3, 4, (70_001,), generator=gen).float() / 8).to(dtype)
    xs = [(base.float() + torch.randint(-2, 3, (70_001,), generator=gen).float() / 8).to(dtype)
          for _ in range(n_models)]
    p, s = PerModel([None] * n_models), spec.shared_params(**{"lambda": 0.7})
    assert spec.kernel.supports(xs, base, p, s)
    fast = spec.kernel.run(xs, base, p, s, None, dtype)
    with kernels_disabled():
        slow = run_method(spec, xs, base, p, s, out_dtype=dtype)
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    assert fast.dtype == slow.dtype == dtype and torch.equal(fast.view(bits), slow.view(bits))
