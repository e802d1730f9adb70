"""Every case of the trust issue, run through the `mergelab` command: how each ends.

    .venv/bin/python examples/trust_cases.py [--out docs/trust_cases.md]

Builds small models, a training run and recipes in a temporary folder, runs
each case as a separate `mergelab` process (so exit codes and tracebacks are
the real ones), and prints a markdown table: command, case, exit code, the
first line of the message, whether every input is byte-identical afterwards,
and whether anything was written where it must not be. The reproduction of a
case is the command line shown (paths relative to the temporary folder).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file


def toy(folder: Path, value: float, names=("w", "b"), nan: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    t = {n: torch.full((4, 3), value) if n == "w" else torch.full((4,), value) for n in names}
    if nan:
        t["w"][0, 0] = float("nan")
    save_file(t, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "toy", "num_hidden_layers": 1}))
    return folder


def recipe(path: Path, data: dict | str) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def linear(models, **extra) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in models],
            **extra}


def build(root: Path) -> list[tuple[str, str, list[str], str]]:
    """(command, case, argv, what a careful tool does) for every case."""
    a, b = toy(root / "a", 1.0), toy(root / "b", 3.0)
    nan_b = toy(root / "nan_b", 3.0, nan=True)
    ok = recipe(root / "ok.yml", linear([a, b]))
    precious = root / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep")
    (root / "link").symlink_to(precious)
    mine = root / "mine"
    run = root / "run"
    for i in range(3):
        ck = toy(run / f"checkpoint-{(i + 1) * 10}", float(i))
        torch.save({"state": {}, "param_groups": []}, ck / "optimizer.pt")
        (ck / "trainer_state.json").write_text(json.dumps({"log_history": [{"step": (i + 1) * 10, "loss": 1.0}]}))
    odd = root / "odd_run"
    for i in range(3):
        toy(odd / f"checkpoint-{(i + 1) * 10}", float(i), names=("w",) if i == 0 else ("w", "b"))
    nan_run = root / "nan_run"
    for i in range(3):
        toy(nan_run / f"checkpoint-{(i + 1) * 10}", float(i), nan=i == 1)
    bad_state = root / "bad_state_run"
    for i in range(2):
        toy(bad_state / f"checkpoint-{(i + 1) * 10}", float(i))
    (bad_state / "trainer_state.json").write_text("[1, 2, 3]")
    adapter = root / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    save_file({"base_model.model.q.lora_A.weight": torch.zeros(4, 3), "base_model.model.q.lora_B.weight":
               torch.zeros(3, 4)}, str(adapter / "adapter_model.safetensors"))
    layered = toy(root / "layered", 1.0, names=("model.layers.0.w", "model.layers.1.w", "lm_head.weight"))
    (layered / "config.json").write_text(json.dumps({"model_type": "toy", "num_hidden_layers": 2}))
    bomb = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    bomb += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    evil = root / "evil"
    evil.mkdir()
    (evil / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                  "vocab_size": 32, "hidden_size": 8, "intermediate_size": 16,
                                                  "num_hidden_layers": 1, "num_attention_heads": 2}))

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {root / 'pwned'}",))

    (evil / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    (root / "text.txt").write_text("hello world\n")
    (root / "latin1.yml").write_bytes("merge_method: linear # caf\xe9\n".encode("latin-1"))
    existing = root / "existing.json"
    existing.write_text("{}")
    ck1 = toy(root / "ck" / "checkpoint-1", 1.0)
    torch.save({"state": {}, "param_groups": []}, ck1 / "optimizer.pt")

    M = "merge"
    cases = [
        (M, "OUT_DIR is an unset variable", ["merge", ok, "", "--overwrite"], "refuse"),
        (M, "OUT_DIR is `.`", ["merge", ok, ".", "--overwrite"], "refuse"),
        (M, "OUT_DIR is /", ["merge", ok, "/", "--overwrite"], "refuse"),
        (M, "OUT_DIR is the home folder", ["merge", ok, "~", "--overwrite"], "refuse"),
        (M, "OUT_DIR is a symlink to another folder", ["merge", ok, root / "link", "--overwrite"], "refuse"),
        (M, "OUT_DIR is an ancestor of an input", ["merge", ok, root, "--overwrite"], "refuse"),
        (M, "OUT_DIR is someone else's folder", ["merge", ok, precious, "--overwrite"], "refuse"),
        (M, "OUT_DIR written by mergelab, first run", ["merge", ok, mine], "succeed"),
        (M, "OUT_DIR written by mergelab, --overwrite", ["merge", ok, mine, "--overwrite"], "succeed"),
        (M, "a PEFT adapter folder as a model", ["merge", recipe(root / "adapter.yml", linear([a, adapter])),
                                                  root / "o-adapter"], "refuse"),
        (M, "--out-shard-size 5B (MergeKit: 5 billion)", ["merge", ok, root / "o-5b", "--out-shard-size", "5B"],
         "succeed, one shard"),
        (M, "--out-shard-size 1e400", ["merge", ok, root / "o-big", "--out-shard-size", "1e400"], "refuse"),
        (M, "weight: .nan", ["merge", recipe(root / "nan.yml", ok.read_text().replace("0.5", ".nan", 1)),
                             root / "o-nan"], "refuse"),
        (M, "weight: 'inf' (a string)", ["merge", recipe(root / "inf.yml", ok.read_text().replace("0.5", "'inf'", 1)),
                                         root / "o-inf"], "refuse"),
        (M, "NaN in an input tensor", ["merge", recipe(root / "nanin.yml", linear([a, nan_b])), root / "o-nanin"],
         "refuse"),
        (M, "NaN in an input tensor, --allow-nonfinite", ["merge", root / "nanin.yml", root / "o-nanin2",
                                                          "--allow-nonfinite"], "succeed, listed"),
        (M, "layer_range past the model's layers", ["merge", recipe(root / "slice.yml", {
            "merge_method": "passthrough", "slices": [{"sources": [{"model": str(layered), "layer_range": [0, 10]}]}]}),
            root / "o-slice"], "refuse"),
        (M, "weights summing to zero with normalize", ["merge", recipe(root / "zero.yml", {
            "merge_method": "linear", "parameters": {"normalize": True}, "models": [
                {"model": str(a), "parameters": {"weight": 1}}, {"model": str(b), "parameters": {"weight": -1}}]}),
            root / "o-zero"], "refuse before reading"),
        (M, "YAML alias bomb", ["merge", recipe(root / "bomb.yml", "\n".join(bomb) + "\nmerge_method: *a8\n"),
                                root / "o-bomb"], "refuse at once"),
        (M, "2 MB recipe", ["merge", recipe(root / "big.yml", "merge_method: linear\n#" + "x" * 2_000_000),
                            root / "o-bigr"], "refuse at once"),
        (M, "recipe nested 5000 deep", ["merge", recipe(root / "deep.yml", "a: " + "[" * 5000 + "]" * 5000),
                                        root / "o-deep"], "refuse"),
        (M, "non-UTF-8 recipe", ["merge", root / "latin1.yml", root / "o-latin"], "refuse, naming the file"),
        (M, "--device bogus", ["merge", ok, root / "o-dev", "--device", "bogus"], "refuse"),
        ("average", "checkpoints with different tensors", ["average", odd, root / "o-odd"], "refuse"),
        ("average", "... with --allow-missing-tensors", ["average", odd, root / "o-odd2", "--allow-missing-tensors"],
         "succeed, listed"),
        ("average", "NaN in a checkpoint", ["average", nan_run, root / "o-nanrun"], "refuse, no 'cosine nan'"),
        ("average", "trainer_state.json is a JSON list", ["average", bad_state, root / "o-bs", "--skip-unstable"],
         "refuse, naming the file"),
        ("recover", "--last 0", ["recover", run, root / "o-r0", "--last", "0"], "refuse"),
        ("recover", "--last -1", ["recover", run, root / "o-r1", "--last", "-1"], "refuse"),
        ("recover", "a healthy run", ["recover", run, root / "o-rec"], "succeed, resume state inside"),
        ("stats", "OUT is the model's own weights", ["stats", "optimizer", ck1, ck1 / "model.safetensors"],
         "refuse"),
        ("stats", "OUT exists", ["stats", "optimizer", ck1, existing], "refuse"),
        ("stats", "gram on a missing local path", ["stats", "gram", root / "nope", root / "text.txt",
                                                   root / "g.safetensors"], "refuse, no network"),
        ("stats", "gram on an unsafe pickle", ["stats", "gram", evil, root / "text.txt", root / "g2.safetensors"],
         "refuse, nothing executed"),
        ("inspect", "a NaN tensor", ["inspect", a, nan_b], "refuse"),
        ("inspect", "--json into an input folder", ["inspect", a, b, "--json", a / "r.json"], "refuse"),
        ("inspect", "--json in a missing folder", ["inspect", a, b, "--json", root / "new" / "dir" / "x.json"],
         "succeed, folder made"),
        ("inspect", "--json over an existing file", ["inspect", a, b, "--json", existing], "refuse"),
        ("analyze", "noise-scale on a JSON-list trainer state", ["analyze", "noise-scale", "--trainer-state",
                                                                  bad_state / "trainer_state.json"], "refuse"),
    ]
    return cases


def snapshot(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink() and "o-" not in p.parent.name and p.parent.name != "mine"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    args = parser.parse_args()
    rows = ["| command | case | expected | exit | message (first line) | inputs intact |", "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cases = build(root)
        for command, case, argv, expected in cases:
            before = snapshot(root)
            env = {**os.environ, "HF_HUB_OFFLINE": "1"}
            proc = subprocess.run([sys.executable, "-m", "mergelab.cli", *map(str, argv), *(
                ["--quiet"] if argv[0] in ("merge", "average") else [])], capture_output=True, text=True,
                timeout=300, cwd=root, env=env)
            after = snapshot(root)
            changed = [p for p in before if before[p] != after.get(p)]
            text = (proc.stderr if proc.returncode else proc.stdout).strip()
            if "Traceback" in proc.stderr:
                text = "TRACEBACK: " + proc.stderr.strip().splitlines()[-1]
            first = next((ln for ln in text.splitlines() if ln.strip() and not ln.startswith(("[transformers]",
                          "/", " "))), "").replace(str(root) + "/", "").replace("|", "\\|")
            shown = " ".join(str(x).replace(str(root) + "/", "").replace(str(root), "$TMP") or "''" for x in argv)
            rows.append(f"| {command} | {case}: `mergelab {shown}` | {expected} | {proc.returncode} | "
                        f"{first[:140]} | {'yes' if not changed else 'NO: ' + ', '.join(changed[:2])} |")
            print(rows[-1], flush=True)
        assert not (root / "pwned").exists(), "the unsafe pickle ran"
    table = "\n".join(rows) + "\n"
    if args.out is not None:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
