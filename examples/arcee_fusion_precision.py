"""How much of arcee_fusion's mask is decided by the compute precision?

    python examples/arcee_fusion_precision.py          # the run behind docs/results-mergekit-examples.md
    python examples/arcee_fusion_precision.py --fast   # fewer sizes

MergeKit 0.1.5 computes arcee_fusion in the recipe's dtype; mergelab in float32. For a base
W ~ N(0, 0.02^2) and a fine-tune W + s * N(0, 0.02^2) stored in bfloat16, this measures the share
of entries whose keep/drop decision differs between
  - mergelab (float32 maths on the bf16 weights) and MergeKit 0.1.5 (bf16 maths), and
  - mergelab's own function evaluated in bf16 and MergeKit (0 if the gap is only precision).
Needs mergekit 0.1.5 (pip install mergelab[bench]). Prints a table; writes nothing else.
"""

from __future__ import annotations

import argparse

import torch
from rich.console import Console
from rich.table import Table

from mergelab.methods.fusion import arcee_fusion


def mergekit_fusion(base: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    group = TensorGroup.from_tensors([base.clone(), theta.clone()], base_index=0)
    return registry.get("arcee_fusion")([group], parameters={})[0]


def kept(out: torch.Tensor, base: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Entries that took the fine-tune's value (where the two differ at all)."""
    return (out.float() - base.float()).abs() > 0.5 * (theta.float() - base.float()).abs()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fast", action="store_true")
    args = ap.parse_args()
    # At most 1,000,000 entries: above that both tools estimate quartiles from random samples.
    shapes = [(256, 256)] if args.fast else [(256, 256), (1000, 1000)]
    scales = [0.001, 0.01, 0.1]
    table = Table("shape", "fine-tune scale s", "kept (float32)", "float32 vs MergeKit bf16",
                  "mergelab-in-bf16 vs MergeKit bf16")
    for shape in shapes:
        for s in scales:
            g = torch.Generator().manual_seed(0)
            base = (0.02 * torch.randn(shape, generator=g)).bfloat16()
            theta = (base.float() + s * 0.02 * torch.randn(shape, generator=g)).bfloat16()
            moved = (theta != base)
            theirs = kept(mergekit_fusion(base, theta), base, theta) & moved
            ours32 = kept(arcee_fusion(theta.float()[None], base.float(), None, None, None), base, theta) & moved
            ours16 = kept(arcee_fusion(theta[None], base, None, None, None), base, theta) & moved
            n = int(moved.sum())
            table.add_row(f"{shape[0]}x{shape[1]}", f"{s:g}", f"{int(ours32.sum()) / n:.1%}",
                          f"{int((ours32 != theirs).sum()) / n:.1%}", f"{int((ours16 != theirs).sum()) / n:.2%}")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
