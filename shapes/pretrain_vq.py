"""Stage 1 of the shapes model: train transformers' `JanusVQVAE` from scratch on shapes renders.

Where it fits: the VQ-VAE turns a 32x32 render into 8x8 = 64 image tokens (and back); the
from-scratch Janus model generates those tokens, and its `decode_image_tokens` must give back
what we trained here. Inputs: scenes from `shapes.world` (half `random_scene`, half scenes of
training prompts; held-out prompts are never used). Outputs in `--out`: `vq.safetensors`,
`vq_config.json`, `progress.json`, `log.jsonl`, and a resumable `checkpoint/`.

Why our own forward: `JanusVQVAE.forward` decodes from indices (no gradient reaches the encoder)
and `decode()` L2-normalises codebook vectors while `encode()` does not. We keep the codebook
*stored* unit-norm (EMA updates of normalised encoder outputs, renormalised every step), so
`decode()`'s normalisation is the identity and `encode()`'s Euclidean argmin equals our
cosine-nearest code: the module's own `encode`/`decode` reproduce the training forward exactly.

Pixels: images are scaled to [-1, 1] (`x / 127.5 - 1`), matching Janus' generation
post-processing with mean = std = 0.5.

Example:
    python -m shapes.pretrain_vq --out scratch/vq --minutes 12 --seed 0
    >>> from shapes.pretrain_vq import VQSettings, build_vq, train
    >>> vq = build_vq(VQSettings(base_channels=32, codebook=32, embed_dim=8))
    >>> vq.config.num_patches
    8
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers.models.janus.configuration_janus import JanusVQVAEConfig
from transformers.models.janus.modeling_janus import JanusVQVAE

from shapes.world import IMAGE_SIZE, random_scene, render, sample_scene, train_prompts


@dataclass
class VQSettings:
    """Model and optimisation settings (saved with every checkpoint)."""

    base_channels: int = 32
    """Width of the first level; every level's width must be a multiple of 32 (GroupNorm(32))."""
    channel_multiplier: tuple[int, ...] = (1, 1, 2)
    """Three levels: downsampling 2**(3-1) = 4, so 32 px -> an 8x8 token grid."""
    latent_channels: int = 64
    """Encoder output / decoder input channels around the 1x1 quant convs."""
    codebook: int = 256
    """Number of codes (the generation vocabulary)."""
    embed_dim: int = 16
    """Code dimension."""
    projection_dim: int = 192
    """Janus aligner/head sizes stored in the config; must equal the LM hidden size (DESIGN §5)."""
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 100
    commitment: float = 0.25
    """Weight of ||normalise(z) - sg(code)||^2 (the encoder's commitment loss)."""
    ema_decay: float = 0.95
    """EMA decay of the code statistics (short memory: training runs are minutes long)."""
    restart_every: int = 50
    """Steps between dead-code restarts (codes with EMA usage < 1e-3 get a random batch vector)."""


def build_vq(settings: VQSettings, seed: int = 0) -> JanusVQVAE:
    """A freshly initialised JanusVQVAE with a unit-norm codebook."""
    torch.manual_seed(seed)
    config = JanusVQVAEConfig(
        embed_dim=settings.embed_dim,
        num_embeddings=settings.codebook,
        latent_channels=settings.latent_channels,
        base_channels=settings.base_channels,
        channel_multiplier=list(settings.channel_multiplier),
        num_res_blocks=1,
        num_patches=IMAGE_SIZE // 2 ** (len(settings.channel_multiplier) - 1),
        projection_dim=settings.projection_dim,
        image_token_embed_dim=settings.projection_dim,
    )
    vq = JanusVQVAE(config)
    with torch.no_grad():
        vq.quantize.embedding.weight.copy_(F.normalize(torch.randn_like(vq.quantize.embedding.weight), dim=-1))
    return vq


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """(B, 32, 32, 3) uint8 -> (B, 3, 32, 32) float in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_images(pixels: torch.Tensor) -> np.ndarray:
    """(B, 3, 32, 32) float in [-1, 1] -> (B, 32, 32, 3) uint8 (clipped)."""
    scaled = ((pixels.detach().float().clamp(-1, 1) + 1.0) * 127.5).round()
    return scaled.permute(0, 2, 3, 1).to(torch.uint8).numpy()


def quantise(vq: JanusVQVAE, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cosine-nearest codes with a straight-through gradient.

    latents: (B, D, H, W) output of quant_conv. Returns (quantised (B, D, H, W) with the value of
    the unit-norm code and the gradient of normalise(z), normalised z (N, D), ids (N,)).
    """
    z = F.normalize(latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]), dim=-1)  # (N, D)
    codes = F.normalize(vq.quantize.embedding.weight, dim=-1)  # (K, D), as decode() does
    ids = (z @ codes.T).argmax(dim=-1)  # (N,)
    chosen = codes[ids]  # (N, D)
    straight = z + (chosen - z).detach()
    b, d, h, w = latents.shape
    return straight.view(b, h, w, d).permute(0, 3, 1, 2), z, ids


def forward(vq: JanusVQVAE, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training forward: encoder -> quant_conv -> quantise -> post_quant_conv -> decoder.
    Returns (reconstruction (B, 3, 32, 32), normalised latents (N, D), code ids (N,))."""
    latents = vq.quant_conv(vq.encoder(pixels))  # (B, D, 8, 8)
    quantised, z, ids = quantise(vq, latents)
    return vq.decoder(vq.post_quant_conv(quantised)), z, ids


@torch.no_grad()
def tokens(vq: JanusVQVAE, images: np.ndarray) -> torch.Tensor:
    """(B, 32, 32, 3) uint8 -> (B, 64) code ids through the module's own `encode`."""
    out = vq.encode(to_pixels(images))
    return out.image_tokens.view(len(images), -1)


@torch.no_grad()
def reconstruct(vq: JanusVQVAE, images: np.ndarray) -> np.ndarray:
    """Encode and decode through the module's own `encode`/`decode`: uint8 in, uint8 out."""
    return to_images(vq.decode(tokens(vq, images)))


@torch.no_grad()
def ema_update(vq: JanusVQVAE, state: dict[str, torch.Tensor], z: torch.Tensor, ids: torch.Tensor,
               settings: VQSettings, rng: torch.Generator) -> None:
    """EMA codebook update on normalised vectors, then restart of dead codes; keeps codes unit-norm."""
    k = settings.codebook
    onehot = F.one_hot(ids, k).float()  # (N, K)
    state["usage"].mul_(settings.ema_decay).add_(onehot.mean(0), alpha=1 - settings.ema_decay)
    state["sums"].mul_(settings.ema_decay).add_(onehot.T @ z, alpha=1 - settings.ema_decay)  # (K, D)
    used = state["usage"] > 1e-5
    weight = vq.quantize.embedding.weight
    weight[used] = F.normalize(state["sums"][used], dim=-1)
    if int(state["step"]) % settings.restart_every == 0:
        dead = (state["usage"] < 1e-3).nonzero().flatten()
        if len(dead):
            pick = torch.randint(len(z), (len(dead),), generator=rng)
            weight[dead] = z[pick]
            state["sums"][dead] = z[pick] * 1e-3
            state["usage"][dead] = 1e-3


def make_batch(seed: int, step: int, batch_size: int) -> np.ndarray:
    """Renders for one step, a pure function of (seed, step) so a resumed run sees the same data."""
    rng = np.random.default_rng([seed, step])
    prompts = train_prompts()
    scenes = [
        random_scene(rng) if i % 2 == 0 else sample_scene(prompts[rng.integers(len(prompts))], rng)
        for i in range(batch_size)
    ]
    return np.stack([render(s) for s in scenes])


def train_step(vq: JanusVQVAE, optimiser: torch.optim.Optimizer, state: dict[str, torch.Tensor],
               images: np.ndarray, settings: VQSettings, rng: torch.Generator
               ) -> tuple[dict[str, float], torch.Tensor]:
    """One optimisation step (MSE + commitment through the straight-through forward); the caller
    sets the learning rate. Returns the step's losses and the code ids it used."""
    pixels = to_pixels(images)
    recon, z, ids = forward(vq, pixels)
    mse = F.mse_loss(recon, pixels)
    commit = F.mse_loss(z, F.normalize(vq.quantize.embedding.weight, dim=-1)[ids].detach())
    loss = mse + settings.commitment * commit
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()
    state["step"].add_(1)
    ema_update(vq, state, z.detach(), ids, settings, rng)
    return {"mse": mse.item(), "commit": commit.item()}, ids


def make_optimiser(vq: JanusVQVAE, settings: VQSettings) -> torch.optim.Optimizer:
    """AdamW over everything but the codebook (the codebook moves by EMA only)."""
    params = [p for n, p in vq.named_parameters() if not n.startswith("quantize.")]
    vq.quantize.embedding.weight.requires_grad_(False)
    return torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)


def lr_at(settings: VQSettings, step: int, fraction: float) -> float:
    """Linear warm-up, then cosine decay to 10 % over the run's time budget (`fraction` in [0, 1])."""
    warm = min(1.0, step / settings.warmup_steps)
    return settings.lr * warm * (0.1 + 0.45 * (1.0 + np.cos(np.pi * min(1.0, fraction))))


# ----------------------------------------------------------------------------- checkpoints


def _state_tensors(vq: JanusVQVAE, optimiser: torch.optim.Optimizer, ema: dict[str, torch.Tensor]) -> dict:
    """Everything a resume needs, as one flat dict of tensors (safetensors has no nesting)."""
    out = {f"model.{k}": v.contiguous() for k, v in vq.state_dict().items()}
    out.update({f"ema.{k}": v.clone() for k, v in ema.items()})
    for i, state in optimiser.state_dict()["state"].items():
        out.update({f"optim.{i}.{k}": torch.as_tensor(v).clone() for k, v in state.items()})
    return out


def save_checkpoint(out: Path, vq: JanusVQVAE, optimiser: torch.optim.Optimizer,
                    ema: dict[str, torch.Tensor], progress: dict) -> None:
    """Atomic: write to temporary names, then rename (a kill mid-save leaves the old checkpoint)."""
    ckpt = out / "checkpoint"
    ckpt.mkdir(parents=True, exist_ok=True)
    save_file(_state_tensors(vq, optimiser, ema), str(ckpt / "state.safetensors.tmp"))
    (ckpt / "progress.json.tmp").write_text(json.dumps(progress, indent=1))
    (ckpt / "state.safetensors.tmp").replace(ckpt / "state.safetensors")
    (ckpt / "progress.json.tmp").replace(ckpt / "progress.json")


def load_checkpoint(out: Path, vq: JanusVQVAE, optimiser: torch.optim.Optimizer,
                    ema: dict[str, torch.Tensor]) -> dict | None:
    """Restore a checkpoint written by `save_checkpoint`; returns its progress or None."""
    ckpt = out / "checkpoint"
    if not (ckpt / "progress.json").exists():
        return None
    tensors = load_file(str(ckpt / "state.safetensors"))
    vq.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    for k in ema:
        ema[k].copy_(tensors[f"ema.{k}"])
    opt_state = optimiser.state_dict()
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            opt_state["state"].setdefault(int(i), {})[name] = value
    optimiser.load_state_dict(opt_state)
    return json.loads((ckpt / "progress.json").read_text())


def save_vq(vq: JanusVQVAE, out: Path) -> None:
    """The deliverable: `vq.safetensors` + `vq_config.json` (load with `load_vq`)."""
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in vq.state_dict().items()}, str(out / "vq.safetensors"))
    (out / "vq_config.json").write_text(json.dumps(vq.config.to_dict(), indent=1))


def load_vq(path: str | Path) -> JanusVQVAE:
    """Load a VQ saved by `save_vq` (eval mode)."""
    path = Path(path)
    config = JanusVQVAEConfig(**{
        k: v for k, v in json.loads((path / "vq_config.json").read_text()).items()
        if k in JanusVQVAEConfig.__dataclass_fields__
    })
    vq = JanusVQVAE(config)
    vq.load_state_dict(load_file(str(path / "vq.safetensors")))
    return vq.eval()


# ----------------------------------------------------------------------------- loop


def new_ema_state(vq: JanusVQVAE, settings: VQSettings) -> dict[str, torch.Tensor]:
    """Codebook statistics for `ema_update`: uniform usage, sums equal to the initial codes."""
    return {"usage": torch.full((settings.codebook,), 1.0 / settings.codebook),
            "sums": vq.quantize.embedding.weight.detach().clone() / settings.codebook,
            "step": torch.zeros((), dtype=torch.long)}


def train(out: Path, minutes: float, seed: int, settings: VQSettings, log_every: int = 50,
          save_every_s: float = 60.0, max_steps: int | None = None) -> JanusVQVAE:
    """Train (or resume) until `minutes` of training time are spent (or `max_steps` are done:
    then the learning-rate schedule follows steps, so the run does not depend on machine load)."""
    out.mkdir(parents=True, exist_ok=True)
    vq = build_vq(settings, seed).train()
    optimiser = make_optimiser(vq, settings)
    ema = new_ema_state(vq, settings)
    progress = load_checkpoint(out, vq, optimiser, ema) or {"elapsed_s": 0.0}
    progress.update(seed=seed, settings=asdict(settings), minutes=minutes, max_steps=max_steps)
    rng = torch.Generator()
    window: list[dict[str, float]] = []
    seen = torch.zeros(settings.codebook, dtype=torch.bool)
    start, last_save = time.time() - progress["elapsed_s"], time.time()
    while (elapsed := time.time() - start) < minutes * 60 and int(ema["step"]) < (max_steps or 2**62):
        step = int(ema["step"]) + 1
        fraction = step / max_steps if max_steps else elapsed / (minutes * 60)
        settings_lr = lr_at(settings, step, fraction)
        for group in optimiser.param_groups:
            group["lr"] = settings_lr
        rng.manual_seed(seed * 1_000_003 + step)  # per-step seeds: a resumed run repeats exactly
        images = make_batch(seed, step, settings.batch_size)
        stats, ids = train_step(vq, optimiser, ema, images, settings, rng)
        window.append(stats)
        seen[ids] = True
        if step % log_every == 0:
            record = {"step": step, "elapsed_s": round(elapsed, 1), "lr": settings_lr,
                      **{k: float(np.mean([w[k] for w in window])) for k in window[0]},
                      "codes_used_window": int(seen.sum())}
            print(json.dumps(record), flush=True)
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            window, seen = [], torch.zeros_like(seen)
        if time.time() - last_save > save_every_s:
            save_checkpoint(out, vq, optimiser, ema, {**progress, "elapsed_s": elapsed, "step": step})
            last_save = time.time()
    progress.update(elapsed_s=time.time() - start, step=int(ema["step"]))
    save_checkpoint(out, vq, optimiser, ema, progress)
    save_vq(vq.eval(), out)
    return vq


# ----------------------------------------------------------------------------- evaluation and CLI


def evaluate(vq: JanusVQVAE, n_per_prompt: int = 4, seed: int = 1234) -> dict[str, float]:
    """Reconstruction MSE (in [-1, 1] units), codebook usage and oracle accuracy on clean renders
    and on VQ reconstructions (official encode/decode) of scenes of every held-out prompt."""
    from shapes.oracle import check_many
    from shapes.world import heldout_prompts

    rng = np.random.default_rng(seed)
    specs = [s for s in heldout_prompts() for _ in range(n_per_prompt)]
    images = np.stack([render(sample_scene(s, rng)) for s in specs])
    vq = vq.eval()
    ids = torch.cat([tokens(vq, images[i : i + 256]) for i in range(0, len(images), 256)])
    recons = np.concatenate([to_images(vq.decode(ids[i : i + 256])) for i in range(0, len(ids), 256)])
    mse = F.mse_loss(to_pixels(recons).float(), to_pixels(images)).item()
    clean = check_many(list(images), specs)
    recon = check_many(list(recons), specs)
    by_cat = {c: float(np.mean([ok for ok, s in zip(recon, specs) if s.category == c]))
              for c in dict.fromkeys(s.category for s in specs)}
    return {"n": len(specs), "recon_mse": mse, "codes_used": int(ids.unique().numel()),
            "oracle_clean": float(np.mean(clean)), "oracle_recon": float(np.mean(recon)),
            **{f"oracle_recon/{c}": v for c, v in by_cat.items()}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=12.0, help="training-time budget (resumes count it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=None, help="also stop after this many steps")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--base-channels", type=int, default=VQSettings.base_channels)
    parser.add_argument("--batch-size", type=int, default=VQSettings.batch_size)
    parser.add_argument("--eval-only", action="store_true", help="evaluate OUT/vq.safetensors and exit")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.eval_only:
        vq = load_vq(args.out)
    else:
        settings = VQSettings(base_channels=args.base_channels, batch_size=args.batch_size)
        vq = train(args.out, args.minutes, args.seed, settings, max_steps=args.max_steps)
    result = evaluate(vq)
    print(json.dumps(result), flush=True)
    (args.out / "eval.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
