"""Held-out evaluation of a shapes-world model: understanding, generation, Nonunified, weak generation.

Where it fits: recomputes the numbers of `shapes/checkpoint/MODEL_CARD.md` (`unigap eval-shapes`),
probes pretraining (`shapes.pretrain`) and scores the go / no-go arms (`shapes.gonogo`). Only
HELD-OUT prompts (`shapes.world.heldout_prompts`) are used. Every rate comes with n and a 95 %
Wilson interval, per category and overall.

- understanding: balanced held-out pairs, categories equally often. Each pair asks a held-out prompt P about an image
  that satisfies P (label yes) or not (label no: a scene of a one-attribute hard negative of P, or 15 %
  a random scene that fails P). Images are VQ reconstructions of renders (what a judge sees when
  it scores generations). Accuracy = balanced accuracy (half the pairs are yes).
- generation: images the model draws for held-out prompts (cfg 2, temperature 1), scored by the
  exact oracle (`shapes.oracle.check`). `generation_category_mean` weights the five categories
  equally, as the understanding pairs do (prompt-uniform "overall" is ~74 % spatial).
- nonunified: share of its own generations its own judge rejects (score < 0.5).
- weak_generation: among those rejections, the share the oracle also calls wrong.

Example:
    python -m pipelines.cli eval-shapes --checkpoint shapes --out /tmp/metrics.json
    >>> from models.loading import load_model
    >>> r = evaluate(load_model("shapes"), n_prompts=20, images_per_prompt=2, understanding_pairs=40, seed=0)
    >>> 0.0 <= r["understanding"]["overall"]["acc"] <= 1.0
    True
"""

from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch

from pipelines.stats import Z95, wilson_ci
from shapes.oracle import check
from shapes.world import hard_negative, heldout_prompts, random_scene, render, sample_scene, satisfies

GEN_CFG_WEIGHT = 2.0
"""Chosen on TRAIN prompts (weights 1 / 2 / 3 / 5 compared, see the model card); 5, the Janus default,
over-saturates this small model's samples."""
UND_BATCH = 64


def rate(k: int, n: int) -> dict:
    lo, hi = wilson_ci(k, n)
    return {"acc": k / n if n else float("nan"), "k": int(k), "n": int(n), "ci95": [round(lo, 4), round(hi, 4)]}


def by_category(categories: list[str], ok: list[bool]) -> dict:
    """{category: rate, ..., "overall": rate}."""
    out = {c: rate(sum(o for cc, o in zip(categories, ok) if cc == c), categories.count(c))
           for c in sorted(set(categories))}
    out["overall"] = rate(sum(ok), len(ok))
    return out


def category_mean(rates: dict) -> dict:
    """The unweighted mean of the per-category rates of a `by_category` result, with a normal 95 %
    interval from Agresti-Coull variances ((k+2)/(n+4), so a 0/n category still counts as uncertain).
    Held-out prompts are ~74 % spatial (the combinatorics of two objects x relation), so "overall"
    mostly measures spatial prompts; this weights every category the same."""
    cats = [v for c, v in rates.items() if c != "overall" and v["n"]]
    mean = sum(v["k"] / v["n"] for v in cats) / len(cats)
    var = sum(((v["k"] + 2) / (v["n"] + 4)) * (1 - (v["k"] + 2) / (v["n"] + 4)) / (v["n"] + 4) for v in cats)
    half = Z95 * math.sqrt(var) / len(cats)
    return {"acc": mean, "categories": len(cats), "n": sum(v["n"] for v in cats),
            "ci95": [round(max(0.0, mean - half), 4), round(min(1.0, mean + half), 4)]}


def heldout_pairs(n_pairs: int, seed: int):
    """Balanced (image uint8 (32,32,3) clean render, held-out prompt spec, label) triples.
    Category first, then prompt: uniform over prompts would make 74 % of the pairs spatial."""
    rng = np.random.default_rng([seed, 7])
    pool = heldout_prompts()
    groups = [[s for s in pool if s.category == c] for c in dict.fromkeys(s.category for s in pool)]
    out = []
    for i in range(n_pairs):
        group = groups[int(rng.integers(len(groups)))]
        spec = group[int(rng.integers(len(group)))]
        yes = i % 2 == 0
        if yes:
            scene = sample_scene(spec, rng)
        else:
            while True:  # hard negative scene (one attribute changed) or 15 % a random scene
                scene = (random_scene(rng) if rng.random() < 0.15
                         else sample_scene(hard_negative(spec, rng), rng))
                if not satisfies(scene, spec):
                    break
        out.append((render(scene), spec, yes))
    return out


@torch.no_grad()
def understanding_accuracy(m, n_pairs: int, seed: int, mode: str | None = None) -> dict:
    """Balanced held-out judge accuracy per category (VQ-reconstructed images, threshold 0.5)."""
    from shapes.pretrain_vq import reconstruct

    pairs = heldout_pairs(n_pairs, seed)
    images = reconstruct(m.janus.model.vqmodel.eval(), np.stack([p[0] for p in pairs]))
    scores = []
    for lo in range(0, len(pairs), UND_BATCH):
        chunk = pairs[lo:lo + UND_BATCH]
        r = m.judge([images[lo + j] for j in range(len(chunk))], [p[1].text for p in chunk], mode=mode)
        scores += [s if s == s else 0.0 for s in r.score]  # unparsable (NaN) counts as "no"
    ok = [(s >= 0.5) == p[2] for s, p in zip(scores, pairs)]
    return by_category([p[1].category for p in pairs], ok)


def heldout_prompt_sample(n_prompts: int, seed: int) -> list:
    """All held-out prompts when n_prompts covers them, else a seeded random subset."""
    pool = heldout_prompts()
    if n_prompts >= len(pool):
        return pool
    idx = np.random.default_rng([seed, 11]).choice(len(pool), n_prompts, replace=False)
    return [pool[i] for i in sorted(idx)]


@torch.no_grad()
def generate(m, specs: list, images_per_prompt: int, seed: int, batch: int = 64, cfg_weight: float | None = None):
    """Own generations for `specs`: (flat images, flat specs, flat tokens (M, T)); cfg 2 unless given."""
    out = m.generate_images([s.text for s in specs], num_images=images_per_prompt, seed=seed,
                            cfg_weight=GEN_CFG_WEIGHT if cfg_weight is None else cfg_weight,
                            batch_size=max(1, batch // images_per_prompt))
    images = [im for ims in out.images for im in ims]
    flat_specs = [s for s in specs for _ in range(images_per_prompt)]
    return images, flat_specs, out.tokens.reshape(len(images), -1)


def generation_accuracy(m, n_prompts: int, images_per_prompt: int, seed: int, specs=None) -> dict:
    """Oracle accuracy of the model's own held-out generations (or of `specs`), per category."""
    specs = specs if specs is not None else heldout_prompt_sample(n_prompts, seed)
    images, flat, _ = generate(m, specs, images_per_prompt, seed)
    return by_category([s.category for s in flat], [check(im, s) for im, s in zip(images, flat)])


@torch.no_grad()
def evaluate(model, n_prompts: int = 130, images_per_prompt: int = 4, understanding_pairs: int = 400,
             seed: int = 0, other_modes: bool = True) -> dict:
    """The card's metrics on held-out prompts (see the module docstring)."""
    model.janus.eval()
    t0 = time.time()
    result = {"settings": {"n_prompts": n_prompts, "images_per_prompt": images_per_prompt,
                           "understanding_pairs": understanding_pairs, "seed": seed,
                           "judge_mode": model.default_judge_mode, "gen_cfg_weight": GEN_CFG_WEIGHT}}
    result["understanding"] = understanding_accuracy(model, understanding_pairs, seed)
    if other_modes:
        for mode in ("prob", "binary", "describe_prob"):
            if mode != model.default_judge_mode:
                k = max(40, understanding_pairs // 4)  # cheaper check of the secondary modes
                result[f"understanding_{mode}"] = understanding_accuracy(model, k, seed, mode)
    specs = heldout_prompt_sample(n_prompts, seed)
    images, flat, _ = generate(model, specs, images_per_prompt, seed)
    oracle_ok = [check(im, s) for im, s in zip(images, flat)]
    cats = [s.category for s in flat]
    result["generation"] = by_category(cats, oracle_ok)
    result["generation_category_mean"] = category_mean(result["generation"])
    scores = []
    for lo in range(0, len(images), UND_BATCH):
        scores += model.judge(images[lo:lo + UND_BATCH], [s.text for s in flat[lo:lo + UND_BATCH]]).score
    rejected = [not (s >= 0.5) for s in scores]  # NaN (unparsable) counts as a rejection
    result["nonunified"] = by_category(cats, rejected)
    rej = [i for i, r in enumerate(rejected) if r]
    result["weak_generation"] = by_category([cats[i] for i in rej], [not oracle_ok[i] for i in rej])
    result["judge_vs_oracle_agreement"] = rate(sum((not r) == o for r, o in zip(rejected, oracle_ok)), len(images))
    result["seconds"] = round(time.time() - t0, 1)
    return result


def run_eval(args) -> int:
    """`unigap eval-shapes`: evaluate a checkpoint, print the overall rates, write metrics.json."""
    from models.loading import load_model

    torch.set_num_threads(args.threads)
    model = load_model(args.checkpoint)
    result = evaluate(model, args.prompts, args.images, args.pairs, args.seed)
    result["meta"] = {"checkpoint": args.checkpoint, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                      "machine": f"{platform.machine()} {platform.processor() or ''} torch {torch.__version__} "
                                 f"threads {args.threads}".strip(),
                      "command": (f"unigap eval-shapes --checkpoint {args.checkpoint} --prompts {args.prompts} "
                                  f"--images {args.images} --pairs {args.pairs} --seed {args.seed}")}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k]["overall"]
                      for k in ("understanding", "generation", "nonunified", "weak_generation")}))
    return 0


def add_cli(sub) -> None:
    """Register `eval-shapes` on an argparse subparsers object (pipelines/cli.py discovers it)."""
    p = sub.add_parser("eval-shapes", help="held-out metrics of a shapes-world checkpoint")
    p.add_argument("--checkpoint", default="shapes", help="model dir or 'shapes' (the shipped model)")
    p.add_argument("--prompts", type=int, default=130, help="held-out prompts for generation (130 = all)")
    p.add_argument("--images", type=int, default=4, help="images per prompt")
    p.add_argument("--pairs", type=int, default=400, help="balanced understanding pairs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="write metrics.json here")
    p.set_defaults(func=run_eval)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    add_cli(ap.add_subparsers(dest="cmd", required=True))
    a = ap.parse_args()
    a.func(a)
