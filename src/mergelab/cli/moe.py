"""`mergelab moe CONFIG OUT`: a mixture of experts from dense models, from a mergekit-moe config."""

from __future__ import annotations

from pathlib import Path

import typer

from mergelab.cli.common import CLEAN_PARTIALS, OVERWRITE, console, out, report_partials, user_errors


def moe_command(
    config: Path = typer.Argument(..., help="mergekit-moe YAML: base_model, experts (source_model, "
                                  "positive_prompts, negative_prompts), gate_mode, dtype, experts_per_token, "
                                  "shared_experts"),
    out_dir: Path = typer.Argument(..., help="output model folder (Mixtral, or Qwen2-MoE with a shared expert)"),
    device: str = typer.Option("cpu", "--device", help="where the base model runs to compute hidden-state gates: "
                               "cpu, cuda or cuda:N"),
    cuda: bool = typer.Option(False, "--cuda", help="same as --device cuda (mergekit's flag)"),
    seed: int = typer.Option(None, "--seed", "--random-seed", help="seed of random gates and of experts' "
                             "noise_scale"),
    gate_dtype: str = typer.Option("float32", "--gate-dtype", help="dtype of the base model's forward pass for "
                                   "the gates (mergekit-moe runs it in bfloat16)"),
    fused: bool = typer.Option(False, "--fused-experts", help="write transformers 5's fused expert tensors "
                               "(experts.gate_up_proj, experts.down_proj; what mergekit 0.1.5 writes for Mixtral) "
                               "instead of one tensor per expert (the Hub's layout, read by every loader)"),
    out_shard_size: str = typer.Option("5GB", "--out-shard-size", help="bytes per shard (5GB, 500MB) or "
                                       "MergeKit's spelling (5B)"),
    copy_tokenizer: bool = typer.Option(True, "--copy-tokenizer/--no-copy-tokenizer",
                                        help="copy the base model's tokenizer into the output"),
    write_model_card: bool = typer.Option(True, "--write-model-card/--no-write-model-card",
                                          help="write README.md describing the experts"),
    all_same: bool = typer.Option(False, "--i-understand-this-is-not-useful-without-training",
                                  help="allow every expert to be the same model (mergekit's flag)"),
    load_in_4bit: bool = typer.Option(False, "--load-in-4bit", hidden=True),
    load_in_8bit: bool = typer.Option(False, "--load-in-8bit", hidden=True),
    overwrite: bool = OVERWRITE,
    clean_partials: bool = CLEAN_PARTIALS,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Mixture of experts from dense models (mergekit-moe's config): each expert's MLPs become one expert of every layer, routers from the base model's hidden states on each expert's prompts."""
    from mergelab.checkpoint.reader import parse_dtype
    from mergelab.checkpoint.writer import parse_size
    from mergelab.errors import InvalidInput
    from mergelab.moe.build import build_moe

    with user_errors():
        if load_in_4bit or load_in_8bit:
            raise InvalidInput(f"--load-in-{4 if load_in_4bit else 8}bit: quantized gate computation is not "
                               "supported; use --gate-dtype bfloat16 (mergekit-moe's default precision) or a GPU")
        report_partials(out_dir, clean_partials)
        try:
            dtype = parse_dtype(gate_dtype)
        except ValueError as exc:
            raise InvalidInput(f"--gate-dtype: {exc}") from None
        result = build_moe(config, out_dir, device="cuda" if cuda else device, seed=seed, gate_dtype=dtype,
                           fused=fused, shard_size=parse_size(out_shard_size), overwrite=overwrite,
                           copy_tokenizer=copy_tokenizer, write_model_card=write_model_card,
                           allow_all_same=all_same, progress=not quiet)
    if result.degenerate_layers:
        console.print(f"[yellow]warning:[/] the gates of {len(result.degenerate_layers)} layer(s) "
                      f"({', '.join(map(str, result.degenerate_layers[:8]))}) are close to parallel (condition "
                      "number > 5, mergekit-moe's threshold): if the experts' prompts are too alike, some experts "
                      "will rarely be chosen; `mergelab.moe.routing.routing_shares` measures it",
                      highlight=False, soft_wrap=True)
    out.print(f"{result.output} with {result.num_experts} experts: {result.tensors} tensors written to "
              f"{result.out_dir} in {result.seconds:.1f} s", soft_wrap=True, highlight=False)


def register(app: typer.Typer) -> None:
    """Add `moe` to the mergelab command."""
    app.command("moe")(moe_command)
