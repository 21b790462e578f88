"""Training speed and memory of one worker: SFT, DPO with precomputed reference log-probs, DPO with a
resident reference model.

Each variant runs in its own subprocess (so peak RSS is its own) on the shapes-sized tiny Janus
(32 px, 64 image tokens, hidden 192, 4 layers, codebook 256), with the exact per-step code Ray Train
workers run (`trainers.train.train_step`, no Ray, no DDP: the per-worker number). Variants:
  * sft            SFT steps, log-probs of the conditional branch.
  * sft_guided     SFT steps, log-probs of the guided distribution at CFG 2 (both branches: what
                   unigap trains by default, train.logprob_branch=guided).
  * dpo_precomp    DPO steps, reference log-probs read from the rows (what unigap does).
  * dpo_resident   DPO steps plus, each step, a forward of a resident reference model (a deepcopy of
                   the base model kept in memory), as a trainer without precomputation would do.
Prints image tokens/s per worker (policy tokens: B*T for SFT, 2*B*T for DPO), peak RSS, and peak RSS
above the post-import baseline; then the resident / precomputed ratios.

    python benchmarks/bench_train.py                     # ~1.5 min on 2 CPU cores (2 repeats)
    python benchmarks/bench_train.py --steps 20 --batch 16
    python benchmarks/bench_train.py --model janus-pro-1b --device cuda --dtype bfloat16 --batch 8 \
        --steps 3 --repeats 1     # GPU only: a Janus-Pro-1B-shaped random model, peak GPU memory too
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import resource
import subprocess
import sys
import time

VARIANTS = ("sft", "sft_guided", "dpo_precomp", "dpo_resident")
PROMPTS = ["a red circle", "two blue squares", "a green triangle left of a yellow circle", "three purple circles"]


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_variant(variant: str, steps: int, batch: int, warmup: int, model: str = "shapes", device: str = "cpu",
                dtype: str = "float32") -> dict:
    """One variant in this process: returns tokens/s and peak memory."""
    import copy

    import numpy as np
    import torch

    from models.lora import LoraSpec, attach_lora
    from bench_generate import build  # benchmarks/ is on sys.path: this file runs as a script
    from trainers.data import PackedRows
    from trainers.train import PolicyLogprobs, TrainArgs, lr_factor, train_step

    torch.set_num_threads(1)
    baseline = _rss_mib()  # after imports: what every worker pays anyway
    base = build(model, device, dtype)  # bench_generate's: the shapes-sized tiny Janus or a random published shape
    T, V = base.num_image_tokens, base.janus.config.vq_config.num_embeddings
    reference = copy.deepcopy(base) if variant == "dpo_resident" else None  # before LoRA is injected
    torch.manual_seed(0)
    policy = attach_lora(base, LoraSpec(r=16, alpha=32, dropout=0.0))  # as measured in RESULTS.md
    policy.model.to(device).train()
    objective = "sft" if variant.startswith("sft") else "dpo"
    args = TrainArgs(objective=objective, model_path="tiny", num_workers=1, batch_size=batch, lr=1e-3,
                     storage_path="/unused", precision="bf16" if dtype == "bfloat16" and device != "cpu" else "fp32")
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    n = batch * (steps + warmup)
    rng = np.random.default_rng(0)
    cols = ("image_tokens",) if objective == "sft" else ("chosen_tokens", "rejected_tokens")
    data = PackedRows(prompts=[PROMPTS[i % 4] for i in range(n)],
                      tokens={c: rng.integers(0, V, (n, T)) for c in cols},  # (n, T) each
                      ref_logp={c: np.full(n, -T * np.log(V)) for c in ("ref_chosen_logp", "ref_rejected_logp")})
    model = PolicyLogprobs(policy, cfg_weight=2.0 if variant == "sft_guided" else 1.0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, 0, steps + warmup, "constant"))
    tokens, t0 = 0, 0.0
    for step in range(steps + warmup):
        if step == warmup:
            sync()
            tokens, t0 = 0, time.perf_counter()
        idx = np.arange(step * batch, (step + 1) * batch)
        if reference is not None:  # the resident reference's forward is part of the step
            with torch.no_grad():
                ids, mask = policy.encode_generation_prompts([data.prompts[i] for i in idx])  # (b, L)
                for c, ref_col in (("chosen_tokens", "ref_chosen_logp"), ("rejected_tokens", "ref_rejected_logp")):
                    tok = torch.from_numpy(data.tokens[c][idx]).to(ids.device)  # (b, T)
                    logits = reference.image_logits(ids, mask, tok)  # (b, T, V)
                    data.ref_logp[ref_col][idx] = torch.log_softmax(logits.float(), -1).gather(
                        -1, tok.unsqueeze(-1)).squeeze(-1).sum(-1).cpu().numpy()  # (b,)
        train_step(model, policy, optimizer, scheduler, data, [idx], args)
        tokens += batch * T * (1 if objective == "sft" else 2)
    sync()
    wall = time.perf_counter() - t0
    held = [policy.model] + ([reference.model] if reference is not None else [])
    weights = {id(t): t.numel() * t.element_size() for m in held for t in list(m.parameters()) + list(m.buffers())}
    return {"variant": variant, "tokens_per_s": tokens / wall, "step_s": wall / steps,
            "weights_mib": sum(weights.values()) / 2**20,
            "peak_rss_mib": _rss_mib(), "baseline_rss_mib": baseline,
            "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else 0.0,
            "params_m": sum(p.numel() for p in base.janus.parameters()) / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="rows per step (a DPO row is a pair)")
    ap.add_argument("--repeats", type=int, default=2, help="subprocesses per variant, interleaved (median)")
    ap.add_argument("--variant", choices=VARIANTS, help="internal: run one variant, print JSON")
    ap.add_argument("--model", default="shapes", help="shapes (CPU), or janus-pro-1b / janus-pro-7b (random weights)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    a = ap.parse_args()
    if a.variant:
        print(json.dumps(run_variant(a.variant, a.steps, a.batch, a.warmup, a.model, a.device, a.dtype)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {v: [] for v in VARIANTS}
    for _ in range(a.repeats):  # interleaved, so load changes on a shared box hit every variant alike
        for v in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--variant", v, "--steps", str(a.steps), "--batch",
                                  str(a.batch), "--warmup", str(a.warmup), "--model", a.model, "--device", a.device,
                                  "--dtype", a.dtype], env=env, check=True,
                                 capture_output=True, text=True).stdout
            runs[v].append(json.loads(out.strip().splitlines()[-1]))
    results = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "variant"} for v, rs in runs.items()}
    print(f"{a.model} Janus ({results['sft']['params_m']:.2f} M params), {a.device} {a.dtype}, batch {a.batch}, "
          f"{a.steps} steps, 1 thread, median of {a.repeats}")
    print(f"{'variant':14s} {'tokens/s':>9s} {'s/step':>7s} {'weights MiB':>12s} "
          f"{'peak RSS MiB':>13s} {'above base':>11s} {'peak GPU MiB':>13s}")
    for v, r in results.items():
        print(f"{v:14s} {r['tokens_per_s']:9.0f} {r['step_s']:7.3f} {r['weights_mib']:12.1f} "
              f"{r['peak_rss_mib']:13.0f} {r['peak_rss_mib'] - r['baseline_rss_mib']:11.0f} {r['peak_gpu_mib']:13.0f}")
    cond, guided = results["sft"], results["sft_guided"]
    print(f"guided / conditional SFT: s/step x{guided['step_s'] / cond['step_s']:.2f}, "
          f"peak RSS x{guided['peak_rss_mib'] / cond['peak_rss_mib']:.2f}")
    pre, res = results["dpo_precomp"], results["dpo_resident"]
    above = lambda r: r["peak_rss_mib"] - r["baseline_rss_mib"]  # noqa: E731
    print(f"resident / precomputed reference: weights x{res['weights_mib'] / pre['weights_mib']:.2f}, "
          f"peak RSS x{res['peak_rss_mib'] / pre['peak_rss_mib']:.2f} (above baseline x{above(res) / above(pre):.2f}), "
          f"tokens/s x{res['tokens_per_s'] / pre['tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
