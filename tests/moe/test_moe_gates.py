"""Gate formulas on hand-worked cases (mergelab.moe.gates)."""

from __future__ import annotations

import math

import pytest
import torch

from mergelab.moe import gates as G


def test_prompt_vectors_last_token_and_masked_mean():
    # 1 layer, 2 prompts, 3 positions, H = 2; prompt 0 is left-padded by one position.
    states = torch.tensor([[[[9.0, 9.0], [1.0, 2.0], [3.0, 4.0]],
                            [[0.0, 2.0], [2.0, 0.0], [4.0, 4.0]]]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    last = G.prompt_vectors(states, mask, "last")
    # last tokens (3, 4) and (4, 4): mean (3.5, 4)
    assert torch.equal(last, torch.tensor([[3.5, 4.0]]))
    mean = G.prompt_vectors(states, mask, "mean")
    # prompt 0: mean of (1,2),(3,4) = (2,3), the padded (9,9) left out; prompt 1: (2, 2); mean (2, 2.5)
    assert torch.allclose(mean, torch.tensor([[2.0, 2.5]]))
    with pytest.raises(ValueError):
        G.prompt_vectors(states, mask, "max")


def test_gate_is_normalized_difference_of_positive_and_negative():
    pos = torch.tensor([[3.0, 4.0], [1.0, 1.0]])
    neg = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    assert torch.allclose(G.gate_from_vectors(pos, None), torch.tensor([[0.6, 0.8], [1 / math.sqrt(2)] * 2]))
    gate = G.gate_from_vectors(pos, neg)
    assert torch.allclose(gate[0], torch.tensor([0.0, 1.0]))
    assert torch.equal(gate[1], torch.zeros(2))  # identical prompts: a zero row (norm clamped), not NaN


def test_cheap_embedding_sums_real_tokens_and_normalizes():
    embed = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    ids = torch.tensor([[0, 1, 2], [1, 1, 1]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    # sum = (1, 2) + 3 * (1, 0) = (4, 2); normalized (2, 1) / sqrt(5), repeated for 3 layers
    out = G.cheap_embedding(embed, ids, mask, num_layers=3)
    assert out.shape == (3, 2)
    assert torch.allclose(out, torch.tensor([2.0, 1.0]).div(math.sqrt(5)).expand(3, 2))


def test_random_gates_distributions_and_seed():
    gen = torch.Generator().manual_seed(0)
    uniform = G.random_gates(4, 8, 100, "uniform_random", gen)
    assert uniform.shape == (4, 8, 100) and uniform.abs().max() <= 0.1 and uniform.abs().max() > 0.09
    normal = G.random_gates(4, 8, 100, "random", torch.Generator().manual_seed(1))
    assert abs(normal.std().item() - 1.0) < 0.05
    again = G.random_gates(4, 8, 100, "random", torch.Generator().manual_seed(1))
    assert torch.equal(normal, again)


def test_degenerate_layers_flags_parallel_gates():
    good = torch.eye(3)[None]                                              # orthogonal rows: cond 1
    bad = torch.tensor([[[1.0, 0.0, 0.0], [0.99, 0.14, 0.0], [0.0, 0.0, 1.0]]])
    assert G.degenerate_layers(torch.cat([good, bad])) == [1]


def test_layer_inputs_are_what_each_decoder_layer_receives():
    # Checked with forward pre-hooks on the decoder layers, not through output_hidden_states.
    from transformers import LlamaForCausalLM

    from moe_kit import llama_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config()).eval()
    seen = []
    hooks = [layer.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
        for layer in model.model.layers]
    batch = {"input_ids": torch.tensor([[1, 5, 9, 13], [1, 1, 20, 30]]), "attention_mask": torch.tensor([[1] * 4, [0, 1, 1, 1]])}
    states = G.layer_inputs(model, batch)
    for h in hooks:
        h.remove()
    assert states.shape == (3, 2, 4, 32)
    for layer in range(3):
        assert torch.equal(states[layer], seen[layer])
