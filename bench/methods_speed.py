"""Side-by-side wall time and peak RSS, mergekit-yaml vs mergelab merge, methods outside bench/run.py's set.

Usage: PYTHONPATH=src python bench/methods_speed.py [method ...]   (default: all below)
Needs the TinyLlama-shaped set /tmp/tinyllama/{base,ft_a,ft_b} (bench/make_checkpoints.py) and
mergekit 0.1.5 (mergelab[bench]); GNU time at /usr/bin/time for the peak RSS (MB).
"""
import json, subprocess, sys, time, shutil, yaml
from pathlib import Path
T = Path("/tmp/tinyllama"); W = Path("/tmp/p2/ms"); W.mkdir(parents=True, exist_ok=True)
base, a, b = str(T / "base"), str(T / "ft_a"), str(T / "ft_b")
tv = lambda **p: [{"model": m, "parameters": dict(p)} for m in (a, b)]
R = {
  "linear": {"merge_method": "linear", "models": tv(weight=0.5)},
  "ties": {"merge_method": "ties", "base_model": base, "models": tv(weight=0.5, density=0.5)},
  "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": base, "models": tv(weight=0.5)},
  "nuslerp": {"merge_method": "nuslerp", "models": [{"model": a, "parameters": {"weight": 0.4}}, {"model": b, "parameters": {"weight": 0.6}}]},
  "nuslerp_base": {"merge_method": "nuslerp", "base_model": base, "models": [{"model": a, "parameters": {"weight": 0.4}}, {"model": b, "parameters": {"weight": 0.6}}]},
  "sce_topk": {"merge_method": "sce", "base_model": base, "models": [{"model": a}, {"model": b}], "parameters": {"select_topk": 0.5}},
  "model_stock": {"merge_method": "model_stock", "base_model": base, "models": [{"model": a}, {"model": b}]},
  "karcher": {"merge_method": "karcher", "models": [{"model": a}, {"model": b}]},
  "multislerp": {"merge_method": "multislerp", "models": [{"model": a, "parameters": {"weight": 0.5}}, {"model": b, "parameters": {"weight": 0.5}}]},
  "multislerp_base": {"merge_method": "multislerp", "base_model": base, "models": [{"model": a, "parameters": {"weight": 0.4}}, {"model": b, "parameters": {"weight": 0.6}}]},
  "karcher_3": {"merge_method": "karcher", "models": [{"model": base}, {"model": a}, {"model": b}]},
  "della_linear": {"merge_method": "della_linear", "base_model": base, "models": tv(weight=0.5, density=0.5, epsilon=0.1)},
  "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": base, "models": tv(weight=0.5, density=0.5, gamma=0.01)},
  "nearswap": {"merge_method": "nearswap", "base_model": a, "models": [{"model": a}, {"model": b}], "parameters": {"t": 0.001}},
  "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": a, "models": [{"model": a}, {"model": b}]},
}
only = sys.argv[1:] or list(R)
rows = []
for name in only:
    rec = dict(R[name], dtype="bfloat16")
    path = W / f"{name}.yml"; path.write_text(yaml.safe_dump(rec))
    res = {}
    for tool in ("mergelab", "mergekit"):
        out = W / f"out_{tool}"; shutil.rmtree(out, ignore_errors=True)
        cmd = ([sys.executable, "-m", "mergelab.cli", "merge", str(path), str(out), "--device", "cpu", "--seed", "0", "--quiet"]
               if tool == "mergelab" else [str(Path(sys.executable).with_name("mergekit-yaml")), str(path), str(out), "--no-copy-tokenizer", "--random-seed", "0", "--quiet", "--out-shard-size", "5B"])
        t0 = time.perf_counter(); p = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True); dt = time.perf_counter() - t0
        rss = int(p.stderr.strip().splitlines()[-1]) / 1024 if p.returncode == 0 else None
        res[tool] = (dt, rss, p.returncode, p.stderr[-300:] if p.returncode else "")
    ml, mk = res["mergelab"], res["mergekit"]
    print(f"{name:16s} mergelab {ml[0]:6.2f}s rc{ml[2]}  mergekit {mk[0]:6.2f}s rc{mk[2]}  mk/ml {mk[0]/ml[0]:5.2f}x  rss ml {ml[1]} mk {mk[1]}", flush=True)
    for t in ("mergelab", "mergekit"):
        if res[t][2]: print("  ", t, res[t][3].replace("\n", " | "))
