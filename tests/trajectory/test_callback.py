"""AveragingCallback inside a real transformers Trainer run on a tiny model."""

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")


def test_lawa_average_saved_beside_checkpoints_equals_mean_of_checkpoints(tmp_path):
    from transformers import LlamaForCausalLM, Trainer, TrainingArguments

    from conftest import TinyTokens, tiny_llama_config
    from mergelab.trajectory.callback import AveragingCallback

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=2))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, save_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], use_cpu=True, logging_steps=100,
                             dataloader_num_workers=0, disable_tqdm=True)
    cb = AveragingCallback("lawa", window=2, every=3)
    Trainer(model=model, args=args, train_dataset=TinyTokens(), callbacks=[cb]).train()

    c3 = load_file(str(tmp_path / "checkpoint-3" / "model.safetensors"))
    c6 = load_file(str(tmp_path / "checkpoint-6" / "model.safetensors"))
    avg = load_file(str(tmp_path / "checkpoint-6" / "averaged" / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(c3[name], c6[name])  # training moved the weights
    for k in c6:
        torch.testing.assert_close(avg[k], (c3[k] + c6[k]) / 2)
    # The averaged folder loads as a model, and the averager's state was saved for resuming.
    LlamaForCausalLM.from_pretrained(tmp_path / "checkpoint-6" / "averaged")
    assert (tmp_path / "checkpoint-6" / "averaged" / "averager.pt").exists()
