"""Mixture of experts from dense models (mergekit-moe's job): `build_moe(config, out_dir)`.

config.py reads and checks mergekit-moe's YAML, gates.py computes the routers,
arch.py names the output tensors and writes config.json, build.py streams it all.
"""

from mergelab.moe.build import build_moe

__all__ = ["build_moe"]
