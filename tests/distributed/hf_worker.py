"""A real transformers Trainer on a tiny Llama under torchrun, with mergelab's DiLoCo callback.

    torchrun --nproc-per-node 2 hf_worker.py OUT_DIR
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch


def main(out: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from mergelab.distributed.hf import use_diloco

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    model = LlamaForCausalLM(cfg)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (64, 8), generator=gen)
    data = [{"input_ids": r, "labels": r} for r in ids]
    args = TrainingArguments(output_dir=str(out / "trainer"), per_device_train_batch_size=4, max_steps=6,
                             learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no",
                             logging_strategy="no", ddp_backend="gloo", disable_tqdm=True, seed=0)
    digests = []

    class Record(TrainerCallback):  # the workers' models between syncs: apart, since no gradient is shared
        def on_step_end(self, args, state, control, model=None, **kw):
            digests.append(float(sum(p.double().sum() for p in model.parameters())))

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[Record()])
    cb = use_diloco(trainer, sync_every=3)
    trainer.train()
    rank = int(os.environ["RANK"])
    torch.save({"params": {k: v.detach().clone() for k, v in model.named_parameters()}, "digests": digests,
                "report": cb.diloco.report(), "ddp": type(trainer.model_wrapped).__name__},
               out / f"rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
