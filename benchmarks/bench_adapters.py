"""Serving several rounds on one replica: merged model copies (the old way) vs named peft adapters.

What it measures, side by side in one run (each setting in a fresh process; peak RSS by ru_maxrss):
  merged   the base model plus, per round, a full model copy with that round's LoRA merged in
  adapters one base model, each round a named adapter on it (`models.lora.AdapterSet`, what
           serve/deployment.py does now)
for 1 and 4 rounds loaded, and the generation time of one batch with a round active (merged weights
vs an unmerged adapter: the LoRA's extra matmuls). Adapters are random LoRA r8 (+ the generation
head, as the default config trains) saved with checksums, on the shipped shapes model.

Run: OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_adapters.py [--model shapes] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, resource, sys, time, torch
from models.loading import load_model
from models.lora import AdapterSet, load_adapter, merge_adapter
mode, model_path, rounds, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
dirs = json.loads(sys.argv[5])[:rounds]
torch.set_num_threads(1)
prompts = ["a red circle", "two blue squares", "a green triangle to the left of a red square", "three yellow stars"]
base = load_model(model_path)
if mode == "merged":
    models = [merge_adapter(load_adapter(load_model(model_path), d)) for d in dirs]
    run = lambda: models[-1].generate_images(prompts, num_images=2, seed=0)
else:
    s = AdapterSet(base)
    for k, d in enumerate(dirs):
        s.add(f"round_{k + 1}", d)
    def run():
        with s.active(f"round_{len(dirs)}") as m:
            return m.generate_images(prompts, num_images=2, seed=0)
run()  # warm-up
times = []
for _ in range(repeats):
    t0 = time.perf_counter(); run(); times.append(time.perf_counter() - t0)
print(json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "gen_s": sorted(times)[len(times) // 2]}))
"""


def make_adapters(model_path: str, n: int, root: str) -> list[str]:
    import torch

    from models.loading import load_model
    from models.lora import LoraSpec, attach_lora, save_adapter

    dirs = []
    for k in range(n):
        m = attach_lora(load_model(model_path), LoraSpec(r=8, alpha=16, modules_to_save=["generation_head"]))
        g = torch.Generator().manual_seed(k)
        with torch.no_grad():
            for name, p in m.model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.01)
        d = os.path.join(root, f"round_{k + 1}")
        save_adapter(m, d)
        dirs.append(d)
    return dirs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        dirs = make_adapters(args.model, 4, tmp)
        size = sum(os.path.getsize(os.path.join(d, "adapter_model.safetensors")) for d in dirs) / 4 / 1024**2
        print(f"model {args.model}; adapter file {size:.1f} MiB each (LoRA r8 + generation head)")
        res = {}
        for rounds in (1, 4):
            for mode in ("merged", "adapters"):
                out = subprocess.run([sys.executable, "-c", CHILD, mode, args.model, str(rounds), str(args.repeats),
                                      json.dumps(dirs)], capture_output=True, text=True, env=env, check=True)
                res[(mode, rounds)] = json.loads(out.stdout.strip().splitlines()[-1])
    print("\n| rounds loaded | merged copies: peak RSS (MiB) | named adapters: peak RSS (MiB) | adapters / merged |"
          " generation s, merged | generation s, adapter | adapter / merged |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for rounds in (1, 4):
        a, b = res[("merged", rounds)], res[("adapters", rounds)]
        print(f"| {rounds} | {a['rss_mb']:.0f} | {b['rss_mb']:.0f} | x{b['rss_mb'] / a['rss_mb']:.2f} | "
              f"{a['gen_s']:.2f} | {b['gen_s']:.2f} | x{b['gen_s'] / a['gen_s']:.2f} |")


if __name__ == "__main__":
    main()
