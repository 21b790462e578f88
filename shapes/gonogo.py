"""Go / no-go: does one offline self-improvement round (rejection-sampling SFT) lift generation?

Where it fits: the shapes-world feasibility check behind the whole pipeline, without Ray. One round
of Han et al.'s Algorithm 1 on the shipped model:
  1. sample N images for each of P TRAIN prompts (cfg as in shapes.evaluate);
  2. judge them with the model's own judge (default mode, accept at score >= 0.5);
  3. fine-tune LoRA (+ the generation head) on the accepted (prompt, image tokens) pairs with
     `trainers.losses.sft_loss` over `m.image_logprobs` (teacher-forced) on the distribution the
     samples were drawn from (`--loss-branch guided`, the default: CFG at the sampling weight, both
     branches trained) or on the conditional branch alone (`conditional`: the recipe of the shipped
     gonogo.json, which made every arm worse; see the model card);
  4. score held-out generation with the exact oracle, before and after.
Two controls train the same recipe on other subsets of the same samples:
  * random judge: as many samples as the own judge accepted, chosen at random;
  * oracle judge (upper bound): every oracle-correct sample.
If the oracle arm cannot move held-out accuracy, no judge can: the dose or the world is the
problem, not the judge. Training-prompt accuracy is reported separately (memorisation vs transfer).

Example:
    python -m shapes.gonogo --checkpoint shapes --prompts 200 --samples 8 --steps 300 \\
        --out scratch/lm/gonogo.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import numpy as np
import torch

from models.janus import JanusUnified
from models.lora import LoraSpec, attach_lora
from shapes.evaluate import GEN_CFG_WEIGHT, by_category, generate, heldout_prompts
from shapes.oracle import check
from shapes.world import train_prompts
from trainers.losses import sft_loss


def sample_round(m: JanusUnified, n_prompts: int, n_samples: int, seed: int, cfg_weight: float | None = None) -> dict:
    """Own samples for n_prompts random TRAIN prompts, with own-judge scores and oracle labels."""
    pool = train_prompts()
    idx = np.random.default_rng([seed, 21]).choice(len(pool), min(n_prompts, len(pool)), replace=False)
    specs = [pool[i] for i in sorted(idx)]
    images, flat, toks = generate(m, specs, n_samples, seed + 1000, cfg_weight=cfg_weight)
    scores = []
    for lo in range(0, len(images), 64):
        scores += m.judge(images[lo:lo + 64], [s.text for s in flat[lo:lo + 64]]).score
    return {"specs": specs, "flat": flat, "tokens": toks,
            "judge": np.array([s >= 0.5 for s in scores]),  # NaN (unparsable) -> rejected
            "oracle": np.array([check(im, s) for im, s in zip(images, flat)])}


def arms(samples: dict, seed: int) -> dict[str, np.ndarray]:
    """Index sets of the samples each arm trains on."""
    own = np.flatnonzero(samples["judge"])
    rng = np.random.default_rng([seed, 22])
    return {"own_judge": own,
            "random_judge": np.sort(rng.choice(len(samples["judge"]), len(own), replace=False)),
            "oracle_judge": np.flatnonzero(samples["oracle"])}


def sft(base: JanusUnified, prompts: list[str], tokens: torch.Tensor, steps: int, batch: int,
        lr: float, seed: int, loss_cfg: float | None = None) -> tuple[JanusUnified, list[float]]:
    """LoRA rejection-sampling SFT on (prompt, image tokens) rows; returns the tuned copy and losses.
    loss_cfg: guidance weight of the log-probs (None: the conditional branch alone)."""
    m = JanusUnified(copy.deepcopy(base.janus), base.processor, base.default_judge_mode)
    m = attach_lora(m, LoraSpec(r=8, alpha=16))
    params = [p for p in m.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = np.random.default_rng([seed, 23])
    losses = []
    m.model.train()
    for step in range(steps):
        pick = rng.choice(len(prompts), min(batch, len(prompts)), replace=False)
        logp = m.image_logprobs([prompts[i] for i in pick], tokens[pick], cfg_weight=loss_cfg).per_token  # (B, T)
        loss = sft_loss(logp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
    m.model.eval()
    return m, losses


def score(m: JanusUnified, heldout_images: int, train_specs: list, train_images: int, seed: int,
          cfg_weight: float | None = None) -> dict:
    """Oracle generation accuracy on all held-out prompts and on the round's train prompts."""
    out = {}
    for name, specs, k in (("heldout", heldout_prompts(), heldout_images), ("train", train_specs, train_images)):
        images, flat, _ = generate(m, specs, k, seed + 5000, cfg_weight=cfg_weight)
        out[name] = by_category([s.category for s in flat], [check(im, s) for im, s in zip(images, flat)])
    return out


def run(m: JanusUnified, args) -> dict:
    """The whole experiment; returns the report (also printed as it goes)."""
    t0 = time.time()
    samples = sample_round(m, args.prompts, args.samples, args.seed, args.cfg_weight)
    j, o = samples["judge"], samples["oracle"]
    report = {"settings": vars(args).copy(), "round": {
        "samples": int(len(j)), "accepted_own": int(j.sum()), "oracle_correct": int(o.sum()),
        "oracle_rate_accepted": float(o[j].mean()) if j.any() else None,
        "oracle_rate_rejected": float(o[~j].mean()) if (~j).any() else None,
        "sample_seconds": round(time.time() - t0, 1)}}
    print(json.dumps(report["round"]), flush=True)
    report["base"] = score(m, args.heldout_images, samples["specs"], args.train_images, args.seed, args.cfg_weight)
    print("base", json.dumps({k: v["overall"] for k, v in report["base"].items()}), flush=True)
    prompts = [s.text for s in samples["flat"]]
    loss_cfg = (args.cfg_weight or GEN_CFG_WEIGHT) if args.loss_branch == "guided" else None
    for name, idx in arms(samples, args.seed).items():
        if len(idx) == 0:
            report[name] = {"skipped": "no accepted samples"}
            continue
        t1 = time.time()
        tuned, losses = sft(m, [prompts[i] for i in idx], samples["tokens"][idx], args.steps, args.batch,
                            args.lr, args.seed, loss_cfg=loss_cfg)
        report[name] = {"train_rows": int(len(idx)), "loss_first": float(np.mean(losses[:10])),
                        "loss_last": float(np.mean(losses[-10:])),
                        **score(tuned, args.heldout_images, samples["specs"], args.train_images, args.seed,
                                args.cfg_weight),
                        "seconds": round(time.time() - t1, 1)}
        print(name, json.dumps({k: v["overall"] if isinstance(v, dict) and "overall" in v else v
                                for k, v in report[name].items()}), flush=True)
    report["seconds"] = round(time.time() - t0, 1)
    return report


def main(argv: list[str] | None = None) -> None:
    from models.loading import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="shapes")
    ap.add_argument("--prompts", type=int, default=200, help="TRAIN prompts sampled in the round")
    ap.add_argument("--samples", type=int, default=8, help="images per prompt")
    ap.add_argument("--steps", type=int, default=300, help="SFT steps per arm")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--heldout-images", type=int, default=9, help="per held-out prompt (all 130 held-out prompts)")
    ap.add_argument("--train-images", type=int, default=2, help="per round train prompt")
    ap.add_argument("--cfg-weight", type=float, default=None,
                    help="guidance for sampling and scoring (default: shapes.evaluate.GEN_CFG_WEIGHT)")
    ap.add_argument("--loss-branch", choices=("guided", "conditional"), default="guided",
                    help="SFT log-probs on the sampled (guided) distribution, or the conditional branch alone")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = run(load_model(args.checkpoint), args)
    report["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
