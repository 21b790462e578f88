"""Generation and judge speed: unigap's model layer against transformers' own paths, side by side.

In one process, on the same model, batch and CFG weight:
  * image generation: `JanusUnified.generate_images` (tokens only, `_sample`) against
    `JanusForConditionalGeneration.generate(generation_mode="image")`;
  * self-judge: the one-forward-pass P(Yes) judge against generating the judge's answer text
    (the paper's binary "The score is s" format, 16 new tokens).
Prints each speed-up ratio (median of `--repeats` interleaved runs). Goals: generation >= 2x,
judge >= 5x. With `--hbm-tbps` (a GPU's memory bandwidth, TB/s) it also prints the generation's
memory roofline: every decode step reads the language model's and generation head's weights once and
each row's KV cache (both CFG rows per image), so images/s <= batch / (T x (weights + rows x (L + T/2)
x KV bytes per token) / bandwidth), and the share of it reached. Record results in
benchmarks/RESULTS.md with the machine and date.

    python benchmarks/bench_generate.py                      # tiny + shapes-sized models, CPU
    python benchmarks/bench_generate.py --model shapes --batch 16 64
    python benchmarks/bench_generate.py --model janus-pro-1b --device cuda --dtype bfloat16 \
        --batch 16 64 --hbm-tbps 3.0                                                       # GPU only (H100)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import GenerationConfig

from models.janus import JUDGE_QUESTION, JUDGE_SYSTEM
from models.tiny import TinySpec, build_tiny

SPECS = {
    "tiny": TinySpec(),
    # the shapes-world model's size: 32 px, 64 image tokens, hidden 192, 4 layers
    "shapes": TinySpec(vq_patch=4, hidden=192, layers=4, heads=6, kv_heads=6, intermediate=512,
                       vision_hidden=64, vision_layers=2, codebook=256, vq_embed_dim=16),
}
PROMPTS = ["a red circle", "two blue squares", "a green triangle left of a yellow circle", "three purple circles"]


def _time(fn, sync) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def bench_generation(m, batch: int, cfg: float, repeats: int, sync) -> tuple[float, float]:
    prompts = (PROMPTS * batch)[:batch]
    seeds = torch.arange(batch).view(batch, 1)
    ids, mask = m.encode_generation_prompts(prompts)
    gc = GenerationConfig(bos_token_id=m.bos_id, pad_token_id=m.pad_id, eos_token_id=m.tokenizer.eos_token_id,
                          generation_kwargs={"boi_token_id": m.boi_id}, do_sample=True, top_k=None,
                          guidance_scale=cfg)
    ours = lambda: m._sample(prompts, seeds, cfg, 1.0, None, False)  # noqa: E731
    theirs = lambda: m.janus.generate(input_ids=ids, attention_mask=mask, generation_mode="image",  # noqa: E731
                                      generation_config=gc)
    ours(), theirs()  # warm-up
    a, b = [], []
    for _ in range(repeats):
        a.append(_time(ours, sync))
        b.append(_time(theirs, sync))
    return statistics.median(a), statistics.median(b)


def bench_judge(m, batch: int, repeats: int, sync) -> tuple[float, float]:
    prompts = (PROMPTS * batch)[:batch]
    images = m.decode_tokens(torch.randint(0, m.janus.config.vq_config.num_embeddings, (batch, m.num_image_tokens)))
    ours = lambda: m.judge(images, prompts, mode="prob")  # noqa: E731
    theirs = lambda: m.answer(images, [JUDGE_QUESTION.format(prompt=p) for p in prompts], 16, JUDGE_SYSTEM)  # noqa: E731
    ours(), theirs()
    a, b = [], []
    for _ in range(repeats):
        a.append(_time(ours, sync))
        b.append(_time(theirs, sync))
    return statistics.median(a), statistics.median(b)


def build(name: str, device: str, dtype: str = "float32"):
    if name in SPECS:
        m = build_tiny(SPECS[name], seed=0)
        m.model.to(getattr(torch, dtype))
    else:  # a published config with random weights: nothing downloaded (GPU machines)
        from models.loading import random_janus_pro

        m = random_janus_pro(name, device=device, dtype=dtype)
    m.model.to(device)
    return m


def roofline_images_per_s(m, batch: int, cfg: float, tbps: float) -> float:
    """The memory-bound ceiling of generation (module doc): weights read once per decode step, plus
    every row's KV cache at its average length over the image (prompt L + T/2)."""
    model = m.janus.model
    lm, head = model.language_model, model.generation_head
    weights = sum(p.numel() * p.element_size() for mod in (lm, head) for p in mod.parameters())
    tc = lm.config
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    kv_per_token = 2 * tc.num_hidden_layers * tc.num_key_value_heads * head_dim * next(lm.parameters()).element_size()
    ids, _ = m.encode_generation_prompts((PROMPTS * batch)[:batch])  # (batch, L)
    T, rows = m.num_image_tokens, batch * (2 if cfg != 1.0 else 1)
    step_bytes = weights + rows * (ids.shape[1] + T / 2) * kv_per_token
    return batch / (T * step_bytes / (tbps * 1e12))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", nargs="+", default=["tiny", "shapes"])
    ap.add_argument("--batch", nargs="+", type=int, default=[8, 32])
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--hbm-tbps", type=float, default=None, help="memory bandwidth (TB/s) for the roofline")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    print(f"torch {torch.__version__}, device {args.device}, {args.dtype}, threads {args.threads}, cfg {args.cfg}")
    print(f"{'model':8} {'batch':>5} {'what':10} {'unigap s':>9} {'baseline s':>10} {'speed-up':>8}")
    for name in args.model:
        m = build(name, args.device, args.dtype)
        for batch in args.batch:
            ours, hf = bench_generation(m, batch, args.cfg, args.repeats, sync)
            imgs = batch / ours
            roof = ""
            if args.hbm_tbps:
                top = roofline_images_per_s(m, batch, args.cfg, args.hbm_tbps)
                roof = f", roofline {top:.1f} images/s at {args.hbm_tbps} TB/s: {imgs / top:.0%} of it"
            print(f"{name:8} {batch:5d} {'generate':10} {ours:9.4f} {hf:10.4f} {hf / ours:7.2f}x  "
                  f"({imgs:.1f} images/s{roof})")
            ours, txt = bench_judge(m, batch, args.repeats, sync)
            print(f"{name:8} {batch:5d} {'judge':10} {ours:9.4f} {txt:10.4f} {txt / ours:7.2f}x")


if __name__ == "__main__":
    main()
