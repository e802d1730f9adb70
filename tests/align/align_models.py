"""Small networks for the alignment tests (also loadable by the CLI as models.py:factory)."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, d_in: int = 12, width: int = 16, depth: int = 3, classes: int = 4):
        super().__init__()
        dims = [d_in] + [width] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x)


class ResNetish(nn.Module):
    """Conv-BN stem, one residual block (shared permutation), a strided stage, flatten, linear."""

    def __init__(self, w: int = 6, classes: int = 4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.conv1 = nn.Conv2d(w, w, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.conv2 = nn.Conv2d(w, w, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(w)
        self.down = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1)
        self.bn3 = nn.BatchNorm2d(2 * w)
        self.fc = nn.Linear(2 * w * 4 * 4, classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        x = torch.relu(self.bn3(self.down(x)))
        return self.fc(torch.flatten(x, 1))


def mlp() -> MLP:
    return MLP()


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 60, lr: float = 0.05) -> nn.Module:
    """A few full-batch Adam steps, so units are distinct as in a trained net; leaves eval mode."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        out = model(x)
        out = out.logits if hasattr(out, "logits") else out
        loss = nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        loss.backward()
        opt.step()
    return model.eval()


def tiny_bert(seed: int):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=32)
    return tf.BertForMaskedLM(cfg).eval()


def tiny_llama(seed: int):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=48, max_position_embeddings=32,
                         tie_word_embeddings=False)
    return tf.LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                        bos_token_id=0, eos_token_id=0)
    return tf.GPT2LMHeadModel(cfg).eval()
