"""Stages 2-3 of the shapes model: a from-scratch tiny Janus that understands well and generates weakly.

Where it fits: after `shapes.pretrain_vq` (the frozen VQ-VAE, loaded into `model.model.vqmodel`),
this trains the real transformers `JanusForConditionalGeneration` (built by `models.tiny`) in two
stages and ships it with `models.loading.save_model`:
  1. understanding: judge rows in every judge mode (describe_prob, prob, binary) on balanced
     matched / mismatched (image, prompt) pairs -- negatives mostly one-attribute hard negatives,
     ~15 % random -- plus caption rows ("Describe the image."), 3 judge questions per image;
     ~25 % clean renders, the rest VQ reconstructions (so the judge sees generation-like images);
  2. generation: teacher-forced text -> VQ-token NLL (10 % unconditional rows, so classifier-free
     guidance has an unconditional branch), mixed with understanding rows so understanding holds.
  +  optional (`--extend-generation MINUTES`, repeatable via --resume): more generation steps as in
     step 2, on their own clock and schedule (the shipped model had one 40-minute phase).
Only TRAIN prompts (`shapes.world.train_prompts`) are ever used; held-out prompts never.
Every batch is a pure function of (seed, stage, step), so `--resume` continues the same stream.

Outputs in `--out`: `model/` (the latest checkpoint, `models.loading.load_model(OUT/model)`),
`state.pt` (optimiser + progress, for `--resume`), `log.jsonl`, `run.json` (command, seeds, config).

Example:
    python -m shapes.pretrain --out scratch/lm/run1 --vq scratch/vq/run1 \\
        --understanding-minutes 35 --generation-minutes 15 --seed 0 --threads 2
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from models.base import judge_row
from models.janus import JanusUnified
from models.tiny import TinySpec, build_tiny_parts
from shapes.pretrain_vq import reconstruct, tokens
from shapes.world import VOCABULARY, caption, hard_negative, render, sample_scene, satisfies, train_prompts
from trainers.cpr import understanding_token_nll

CAPTION_QUESTION = "Describe the image."  # what JanusUnified.describe asks


@dataclass
class PretrainConfig:
    """Model sizes and optimisation settings (saved in run.json)."""

    spec: TinySpec = field(default_factory=lambda: TinySpec(
        hidden=128, layers=4, heads=4, kv_heads=4, intermediate=384, vision_hidden=128, vision_layers=2,
        codebook=256, vq_embed_dim=16, vq_base_channels=32, vq_channel_multiplier=[1, 1, 2],
        vq_res_blocks=1, vq_latent_channels=64, vision_patch=8, vq_patch=4, max_position=256))
    und_images: int = 12
    """Images per understanding step; each gives 3 judge rows and sometimes a caption row."""
    mix_images: int = 6
    """Understanding images per generation step (keeps understanding from drifting)."""
    gen_rows: int = 32
    """Generation rows per step."""
    caption_prob: float = 0.4
    """Chance that an image also gets a "Describe the image." caption row."""
    mode_probs: dict = field(default_factory=lambda: {"describe_prob": 0.8, "prob": 0.14, "binary": 0.06})
    clean_frac: float = 0.25
    """Share of understanding images that are clean renders (the rest are VQ reconstructions)."""
    random_neg_frac: float = 0.15
    uncond_frac: float = 0.10
    answer_weight: float = 3.0
    """Extra weight of the Yes/No/0/1 answer token in the understanding NLL (one bit per row)."""
    lr: float = 1.5e-3
    gen_lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.01


# ----------------------------------------------------------------------------- model


def build_model(cfg: PretrainConfig, vq_dir: Path, seed: int) -> JanusUnified:
    """A fresh tiny Janus (HF default init) with the trained VQ loaded, frozen, and the generation
    embeddings initialised from the unit-norm codebook (similar codes start with similar inputs)."""
    model, processor = build_tiny_parts(cfg.spec, words=tuple(VOCABULARY), seed=seed, init_std=None)
    vq_cfg = json.loads((vq_dir / "vq_config.json").read_text())
    s = cfg.spec
    want = {"num_embeddings": s.codebook, "embed_dim": s.vq_embed_dim, "base_channels": s.vq_base_channels,
            "channel_multiplier": list(s.vq_channel_multiplier), "num_res_blocks": s.vq_res_blocks,
            "latent_channels": s.vq_latent_channels}
    bad = {k: (vq_cfg.get(k), v) for k, v in want.items() if vq_cfg.get(k) != v}
    if bad:
        raise ValueError(f"VQ config in {vq_dir} does not match the TinySpec: {bad}")
    model.model.vqmodel.load_state_dict(load_file(str(vq_dir / "vq.safetensors")))
    with torch.no_grad():
        code = F.normalize(model.model.vqmodel.quantize.embedding.weight, dim=-1)  # (K, D)
        model.model.generation_embeddings.weight.copy_(code)
    return JanusUnified(model, processor, judge_mode="describe_prob")


def trainable_parameters(m: JanusUnified) -> list[torch.nn.Parameter]:
    """Everything but the frozen VQ."""
    for p in m.janus.model.vqmodel.parameters():
        p.requires_grad_(False)
    return [p for p in m.janus.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------- data


@functools.lru_cache(maxsize=1)
def train_by_category() -> list[list]:
    """Train prompts grouped by category. Sampling a category first, then a prompt, keeps the easy
    categories visible: uniform over prompts would be ~75 % spatial, the hardest relation."""
    pool = train_prompts()
    return [[s for s in pool if s.category == c] for c in dict.fromkeys(s.category for s in pool)]


def sample_specs(n: int, rng: np.random.Generator) -> list:
    groups = train_by_category()
    return [g[int(rng.integers(len(g)))] for g in (groups[int(rng.integers(len(groups)))] for _ in range(n))]


def negative_prompt(spec, scene, rng: np.random.Generator, cfg: PretrainConfig, allowed: set, pool: list):
    """A train prompt the scene does not satisfy: a one-attribute hard negative, or a random one."""
    if rng.random() >= cfg.random_neg_frac:
        try:
            return hard_negative(spec, rng, scene, allowed=allowed)
        except ValueError:
            pass
    while True:
        neg = pool[int(rng.integers(len(pool)))]
        if not satisfies(scene, neg):
            return neg


def understanding_rows(n_images: int, rng: np.random.Generator, vq, cfg: PretrainConfig) -> dict:
    """Rows for `n_images` scenes of train prompts: 3 balanced judge questions per image (yes, no,
    and a coin flip) in random modes, plus caption rows. Returns {system_or_None: (images, q, t)}."""
    pool = train_prompts()
    allowed = set(pool)
    specs = sample_specs(n_images, rng)
    scenes = [sample_scene(s, rng) for s in specs]
    clean = np.stack([render(s) for s in scenes])
    recon = reconstruct(vq, clean)
    use_clean = rng.random(n_images) < cfg.clean_frac
    images = [clean[i] if use_clean[i] else recon[i] for i in range(n_images)]
    modes, probs = list(cfg.mode_probs), np.array(list(cfg.mode_probs.values()))
    groups: dict = {}
    for img, spec, scene in zip(images, specs, scenes):
        cap = caption(scene)
        for yes in (True, False, bool(rng.random() < 0.5)):
            prompt = spec if yes else negative_prompt(spec, scene, rng, cfg, allowed, pool)
            q, t, system = judge_row(modes[rng.choice(len(modes), p=probs / probs.sum())], prompt.text, cap, yes)
            for lst, v in zip(groups.setdefault(system, ([], [], [])), (img, q, t)):
                lst.append(v)
        if rng.random() < cfg.caption_prob:
            for lst, v in zip(groups.setdefault(None, ([], [], [])),
                              (img, CAPTION_QUESTION, f" {cap}<|end_of_sentence|>")):
                lst.append(v)
    return groups


def generation_rows(n: int, rng: np.random.Generator, vq, uncond_frac: float):
    """(prompts, VQ tokens (n, T), unconditional mask (n,)) for scenes of random train prompts."""
    specs = sample_specs(n, rng)
    images = np.stack([render(sample_scene(s, rng)) for s in specs])
    return [s.text for s in specs], tokens(vq, images), torch.from_numpy(rng.random(n) < uncond_frac)


# ----------------------------------------------------------------------------- losses


def understanding_loss(m: JanusUnified, groups: dict, cfg: PretrainConfig) -> tuple[torch.Tensor, dict]:
    """Weighted token NLL over all groups (one forward per system prompt) + answer-token accuracy."""
    answer_ids = torch.tensor(m._yes_no[0] + m._yes_no[1] + m.tokenizer.convert_tokens_to_ids(["0", "1"]))
    total, weight_sum, correct, answered = 0.0, 0.0, 0, 0
    for system, (images, questions, targets) in groups.items():
        nll, labels, logits = understanding_token_nll(m, images, questions, targets, system)  # (B, L-1), ...
        is_answer = torch.isin(labels, answer_ids)
        w = (labels != -100).float() * torch.where(is_answer, cfg.answer_weight, 1.0)
        total = total + (nll * w).sum()
        weight_sum += w.sum().item()
        pred = logits.argmax(-1)
        correct += int((pred == labels)[is_answer].sum())
        answered += int(is_answer.sum())
    return total / weight_sum, {"answer_acc": correct / max(answered, 1), "answers": answered}


def generation_loss(m: JanusUnified, prompts: list[str], image_tokens: torch.Tensor,
                    uncond: torch.Tensor) -> torch.Tensor:
    """Mean per-token NLL of the VQ tokens given the prompt (or the CFG-unconditional prompt):
    the same teacher-forced pass as `JanusUnified.image_logprobs`, with some rows unconditional."""
    ids, mask = m.encode_generation_prompts(prompts)
    ids = torch.where(uncond[:, None], m._uncond_ids(ids), ids)  # BOS + pads + BOI rows
    logits = m.image_logits(ids, mask, image_tokens)  # (B, T, V)
    logp = torch.log_softmax(logits.float(), -1).gather(-1, image_tokens.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return -logp.mean()


def lr_factor(step: int, fraction: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 % over the stage's time budget."""
    return min(1.0, step / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, fraction))))


def train_step(m, opt, stage: str, step: int, seed: int, cfg: PretrainConfig, vq) -> dict:
    """One optimiser step of `stage` ("understanding" or "generation"); batch = f(seed, stage, step)."""
    rng = np.random.default_rng([seed, 1 if stage == "understanding" else 2, step])
    m.janus.train()
    if stage == "understanding":
        loss, stats = understanding_loss(m, understanding_rows(cfg.und_images, rng, vq, cfg), cfg)
        stats["und_loss"] = loss.item()
    else:
        g = generation_loss(m, *generation_rows(cfg.gen_rows, rng, vq, cfg.uncond_frac))
        u, stats = understanding_loss(m, understanding_rows(cfg.mix_images, rng, vq, cfg), cfg)
        loss = g + u
        stats.update(gen_loss=g.item(), und_loss=u.item())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
    opt.step()
    return stats


# ----------------------------------------------------------------------------- quick held-out probe


@torch.no_grad()
def probe(m: JanusUnified, stage: str, seed: int, n: int = 96) -> dict:
    """A small held-out check to see where training stands (full numbers: shapes.evaluate)."""
    from shapes.evaluate import generation_accuracy, understanding_accuracy

    m.janus.eval()
    out = {"heldout_und": understanding_accuracy(m, n, seed, "describe_prob")["overall"]["acc"]}
    if stage == "generation":
        out["heldout_gen"] = generation_accuracy(m, n, 1, seed)["overall"]["acc"]
    return out


# ----------------------------------------------------------------------------- loop


def run_stage(m, opt, stage: str, minutes: float, progress: dict, ctx: dict, clock: str | None = None,
              warmup_from: int = 0) -> None:
    """Train `stage` until its time budget (measured on progress[clock], default "<stage>_s") is
    spent, logging, probing and checkpointing."""
    cfg, seed, vq, out = ctx["cfg"], ctx["seed"], ctx["vq"], ctx["out"]
    key, base_lr = clock or f"{stage}_s", (cfg.lr if stage == "understanding" else cfg.gen_lr)
    window: list[dict] = []
    t0, last_save, last_probe = time.time() - progress.get(key, 0.0), time.time(), time.time()
    while (elapsed := time.time() - t0) < minutes * 60:
        step = progress.setdefault(f"{stage}_steps", 0) + 1
        for g in opt.param_groups:
            g["lr"] = base_lr * lr_factor(step - warmup_from, elapsed / (minutes * 60), cfg.warmup)
        window.append(train_step(m, opt, stage, step, seed, cfg, vq))
        progress[f"{stage}_steps"], progress[key] = step, time.time() - t0
        if step % 25 == 0:
            rec = {"stage": stage, "step": step, "elapsed_s": round(elapsed, 1), "lr": opt.param_groups[0]["lr"],
                   **{k: round(float(np.mean([w[k] for w in window])), 4) for k in window[0]}}
            if time.time() - last_probe > ctx["probe_every_s"]:
                p0 = time.time()
                rec.update(probe(m, stage, seed))
                t0 += time.time() - p0  # probe time is not training time
                last_probe = time.time()
            log(out, rec)
            window = []
        if time.time() - last_save > ctx["save_every_s"]:
            save_state(m, opt, progress, out)
            last_save = time.time()
    save_state(m, opt, progress, out)


def log(out: Path, rec: dict) -> None:
    print(json.dumps(rec), flush=True)
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")


def save_state(m: JanusUnified, opt, progress: dict, out: Path) -> None:
    """The model via save_model (loadable checkpoint) + optimiser/progress for --resume, atomically."""
    from models.loading import save_model

    tmp = out / "model.tmp"
    save_model(m, tmp)
    torch.save({"opt": opt.state_dict(), "progress": progress}, out / "state.pt.tmp")
    if (out / "model").exists():
        (out / "model").rename(out / "model.old")
    tmp.rename(out / "model")
    (out / "state.pt.tmp").replace(out / "state.pt")
    if (out / "model.old").exists():
        import shutil

        shutil.rmtree(out / "model.old")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--vq", type=Path, required=True, help="directory with vq.safetensors + vq_config.json")
    ap.add_argument("--understanding-minutes", type=float, default=35.0)
    ap.add_argument("--generation-minutes", type=float, default=15.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--probe-minutes", type=float, default=5.0)
    ap.add_argument("--save-minutes", type=float, default=3.0)
    ap.add_argument("--answer-weight", type=float, default=PretrainConfig.answer_weight)
    ap.add_argument("--modes", default=None, help='judge-mode shares, e.g. "describe_prob=0.9,prob=0.07,binary=0.03"')
    ap.add_argument("--gen-lr", type=float, default=PretrainConfig.gen_lr)
    ap.add_argument("--gen-rows", type=int, default=PretrainConfig.gen_rows)
    ap.add_argument("--mix-images", type=int, default=PretrainConfig.mix_images)
    ap.add_argument("--extend-generation", type=float, default=0.0, metavar="MINUTES",
                    help="after stages 1-2 (e.g. with --resume on a finished run): one more generation phase of "
                         "MINUTES with its own warm-up and cosine; the step counter (and so the data) continues")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = PretrainConfig(answer_weight=args.answer_weight, gen_lr=args.gen_lr, gen_rows=args.gen_rows,
                         mix_images=args.mix_images)
    if args.modes:
        cfg.mode_probs = {k: float(v) for k, v in (kv.split("=") for kv in args.modes.split(","))}
    m = build_model(cfg, args.vq, args.seed)
    vq = m.janus.model.vqmodel.eval()
    opt = torch.optim.AdamW(trainable_parameters(m), lr=cfg.lr, weight_decay=cfg.weight_decay)
    progress: dict = {}
    if args.resume and (args.out / "state.pt").exists():
        from models.loading import load_model

        m.janus.load_state_dict(load_model(str(args.out / "model")).janus.state_dict())
        state = torch.load(args.out / "state.pt", weights_only=False)
        opt.load_state_dict(state["opt"])
        progress = state["progress"]
    # A resumed run appends its command (and settings) to the history: the record of how it was made.
    prev = json.loads((args.out / "run.json").read_text()) if progress else {}
    history = prev.get("history", [prev] if prev else [])
    history.append({"command": "python -m shapes.pretrain " + " ".join(sys.argv[1:] if argv is None else argv),
                    "resumed_at": {k: v for k, v in progress.items()}, "config": asdict(cfg),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    (args.out / "run.json").write_text(json.dumps({
        "seed": args.seed, "data_seeds": "numpy default_rng([seed, stage(1|2), step])", "threads": args.threads,
        "vq": str(args.vq), "history": history}, indent=1, default=str))
    ctx = {"cfg": cfg, "seed": args.seed, "vq": vq, "out": args.out,
           "probe_every_s": args.probe_minutes * 60, "save_every_s": args.save_minutes * 60}
    run_stage(m, opt, "understanding", args.understanding_minutes, progress, ctx)
    for g in opt.param_groups:  # stage 2 starts a fresh schedule
        g["lr"] = cfg.gen_lr
    run_stage(m, opt, "generation", args.generation_minutes, progress, ctx)
    if args.extend_generation > 0:
        # An extra phase has its own clock (so its own warm-up + cosine) and shares the step counter,
        # so its batches are new data. A run killed inside the phase resumes inside it.
        if not progress.get("extra_open"):
            progress.update(extra_phases=progress.get("extra_phases", 0) + 1, extra_open=True, extra_s=0.0,
                            extra_start_step=progress["generation_steps"])
        run_stage(m, opt, "generation", args.extend_generation, progress, ctx, clock="extra_s",
                  warmup_from=progress["extra_start_step"])
        progress["extra_open"] = False
        save_state(m, opt, progress, args.out)
    log(args.out, {"done": True, **{k: v for k, v in progress.items()}})


if __name__ == "__main__":
    main()
