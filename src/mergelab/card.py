"""What is written next to the merged weights: the recipe, a model card, a JSON report."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from mergelab.version import __version__

if TYPE_CHECKING:
    from mergelab.engine import RunReport
    from mergelab.plan import Plan
    from mergelab.recipe import Recipe


def report_dict(recipe: "Recipe", plan: "Plan", report: "RunReport", seed: int | None) -> dict:
    return {
        "mergelab_version": __version__,
        "method": recipe.method.name,
        "inputs": [str(ck.path) for ck in plan.checkpoints],
        "base_model": recipe.base,
        "seed": seed,
        "device": report.device,
        "tensors": report.tensors,
        "merged": report.merged,
        "handled_specially": [{"tensor": n, "how": why} for n, why in report.copied],
        "left_out": [{"model": m, "tensor": t, "why": why} for m, t, why in report.left_out],
        "nonfinite_inputs": list(report.nonfinite),
        "ignored_parameters": list(plan.ignored),
        "bytes_read": report.bytes_read,
        "bytes_written": report.bytes_written,
        "seconds": round(report.seconds, 3),
    }


def model_card(rec: "Recipe", plan: "Plan", report: "RunReport", seed: int | None) -> str:
    lines = [
        "---",
        "library_name: transformers",
        "tags: [mergelab, merge]",
        "---",
        "",
        f"# Merged with mergelab ({rec.method.name})",
        "",
        "## Inputs",
        "",
    ]
    for ck in plan.checkpoints:
        role = " (base)" if rec.base is not None and str(ck.path) == rec.base else ""
        lines.append(f"- `{ck.path}`{role}")
    lines += ["", "## Method", "", f"`{rec.method.name}`" + (f", seed {seed}" if rec.method.randomized else ""),
              "", "## Recipe", "", "```yaml", rec.to_yaml().rstrip(), "```", ""]
    special = [(n, why) for n, why in report.copied]
    if special:
        lines += ["## Tensors handled specially", ""]
        lines += [f"- `{n}`: {why}" for n, why in special[:200]]
        if len(special) > 200:
            lines.append(f"- ... and {len(special) - 200} more (see mergelab_report.json)")
        lines.append("")
    if report.nonfinite:
        lines += ["## Inputs with NaN/Inf (merged as they were, by request)", ""]
        lines += [f"- `{t}`" for t in report.nonfinite[:200]]
        lines.append("")
    if report.left_out:
        lines += ["## Input tensors left out", ""]
        lines += [f"- `{t}` of `{m}`: {why}" for m, t, why in report.left_out[:200]]
        lines.append("")
    return "\n".join(lines)


def output_files(recipe: "Recipe", plan: "Plan", report: "RunReport", seed: int | None, *,
                 model_card_file: bool = True
                 ) -> dict[str, str]:
    files = {
        "mergelab_recipe.yml": recipe.to_yaml(),
        "mergelab_report.json": json.dumps(report_dict(recipe, plan, report, seed), indent=2),
    }
    if model_card_file:
        files["README.md"] = model_card(recipe, plan, report, seed)
    return files
