"""The generate and judge stages (Ray Data actor pools) with 1 vs 2 actors, and the same work without Ray.

What it measures, side by side in one run on one local Ray: for the first `--prompts` training
prompts of the shapes world x `--images` samples at the default config's CFG / temperature / judge,
  no-ray     one process, the model's own loop (generate_images + judge, batch as the stage's)
  actors=1   pipelines.stages.generate_table then judge_table with one actor each (configs/shapes.yaml)
  actors=2   the same with two actors each (one per core on a 2-core box)
  fused      generate_table(judge=True): one pool generating and judging (judge.fused), 1 and 2 actors
and prints seconds per stage and the ratios (Ray overhead = actors=1 / no-ray; scaling = actors=1 /
actors=2; fused vs two pools). The outputs of all settings are checked to be identical (same
tokens, same scores).

Run: OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_stages.py [--prompts 64] [--images 8]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--images", type=int, default=8)
    args = ap.parse_args()

    import ray
    import torch

    from models.loading import load_model
    from pipelines.config import load_config
    from pipelines.rounds import read_prompt_sets
    from pipelines.stages import _unpng, generate_table, judge_table

    torch.set_num_threads(1)
    cfg = load_config("configs/shapes.yaml", [f"generate.num_images={args.images}"])
    prompts = sorted(read_prompt_sets(cfg)[0], key=lambda r: r["prompt_id"])[: args.prompts]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    times, outs = {}, {}
    for actors in (1, 2):
        c = load_config("configs/shapes.yaml", [f"generate.num_images={args.images}", f"generate.num_actors={actors}",
                                                f"judge.num_actors={actors}"])
        t0 = time.perf_counter()
        samples = generate_table(prompts, c, round_=1)
        t1 = time.perf_counter()
        judged = judge_table(samples, c)
        times[f"actors={actors}"] = (t1 - t0, time.perf_counter() - t1)
        outs[actors] = judged
        t0 = time.perf_counter()
        outs[f"fused{actors}"] = generate_table(prompts, c, round_=1, judge=True)
        times[f"fused, actors={actors}"] = (time.perf_counter() - t0, 0.0)
    ray.shutdown()
    g = cfg.generate
    m = load_model(cfg.model.path)
    t0 = time.perf_counter()
    from pipelines.stages import sample_seed

    tokens = []
    for lo in range(0, len(prompts), g.batch_size):
        batch = prompts[lo:lo + g.batch_size]
        out = m.generate_images([p["prompt"] for p in batch], num_images=args.images,
                                seed=[sample_seed(cfg.run.seed, 1, p["prompt_id"]) for p in batch],
                                cfg_weight=g.cfg_weight, temperature=g.temperature, top_k=g.top_k)
        tokens.append(out.tokens.reshape(len(batch) * args.images, -1).numpy())
    t1 = time.perf_counter()
    images = [_unpng(b) for b in outs[1]["png"]]
    scores = []
    for lo in range(0, len(images), cfg.judge.batch_size):
        scores += m.judge(images[lo:lo + cfg.judge.batch_size],
                          list(outs[1]["prompt"][lo:lo + cfg.judge.batch_size])).score
    times["no-ray"] = (t1 - t0, time.perf_counter() - t1)
    same = (outs[1]["image_tokens"].tolist() == outs[2]["image_tokens"].tolist()
            and np.allclose(outs[1]["score"], outs[2]["score"], atol=1e-5)
            and np.concatenate(tokens).tolist() == outs[1]["image_tokens"].tolist()
            and np.allclose(outs[1]["score"], scores, atol=1e-5)
            and all(outs[f"fused{a}"]["image_tokens"].tolist() == outs[1]["image_tokens"].tolist()
                    and np.allclose(outs[f"fused{a}"]["score"], outs[1]["score"], atol=1e-5) for a in (1, 2)))
    n = len(prompts) * args.images
    print(f"{len(prompts)} prompts x {args.images} images = {n} samples; outputs identical across settings: {same}")
    print("\n| setting | generate s | judge s | total s | images/s |")
    print("|---|---:|---:|---:|---:|")
    for k, (a, b) in times.items():
        print(f"| {k} | {a:.1f} | {b:.1f} | {a + b:.1f} | {n / (a + b):.1f} |")
    one, two, raw, f1, f2 = (sum(times[k]) for k in ("actors=1", "actors=2", "no-ray", "fused, actors=1",
                                                      "fused, actors=2"))
    print(f"\nRay overhead (actors=1 / no-ray): x{one / raw:.2f}; scaling 1 -> 2 actors: x{one / two:.2f}; "
          f"fused vs two pools: x{one / f1:.2f} (1 actor), x{two / f2:.2f} (2 actors); "
          f"fused 2 actors vs two pools of 1: x{one / f2:.2f}")


if __name__ == "__main__":
    main()
