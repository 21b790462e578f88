"""The `unigap` command line: one entry point, one subcommand per job.

Where it fits: `pyproject.toml` installs it as the `unigap` console script; `ray job submit -- unigap
run ...` uses the same entry point on a cluster. A subcommand's module declares its arguments
(`add_cli`) and is listed only where it exists; Ray and Serve are imported by the handlers only,
while `--help` does import torch (through shapes.evaluate: about 3 s).

Example:
    $ unigap --help
    $ unigap demo --model tiny --prompts "a red circle" "two blue squares" -n 4
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _demo(args: argparse.Namespace) -> int:
    """Generate N images per prompt and let the same model judge them (no Ray)."""
    import torch

    from models.loading import load_model

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    t0 = time.perf_counter()
    m = load_model(args.model, judge_mode=args.judge_mode)
    mode = args.judge_mode or m.default_judge_mode
    out = m.generate_images(args.prompts, num_images=args.n, seed=args.seed, cfg_weight=args.cfg)
    flat_images = [im for row in out.images for im in row]
    flat_prompts = [p for p in args.prompts for _ in range(args.n)]
    verdict = m.judge(flat_images, flat_prompts, mode=mode)
    rejected = sum(1 for s, v in zip(verdict.score, verdict.valid) if v and s < 0.5)
    valid = sum(verdict.valid)
    for i, p in enumerate(args.prompts):
        scores = verdict.score[i * args.n:(i + 1) * args.n]
        print(f"{p!r}: own-judge scores {', '.join(f'{s:.2f}' for s in scores)}")
    print(f"Nonunified score (share of its own images its own judge rejects): {rejected}/{valid} valid "
          f"({mode} judge, {time.perf_counter() - t0:.1f} s)")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        for k, (im, p) in enumerate(zip(flat_images, flat_prompts)):
            im.save(os.path.join(args.out, f"{k:03d}.png"))
        print(f"images written to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="unigap", description="Self-improvement of unified multimodal models on Ray.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="generate images and self-judge them with the same model (no Ray)")
    demo.add_argument("--model", default="shapes", help="model path, hub id, 'shapes' (shipped) or 'tiny'")
    demo.add_argument("--prompts", nargs="+", default=["a red circle", "two blue squares", "a green triangle"])
    demo.add_argument("-n", type=int, default=4, help="images per prompt")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance weight (1 = none)")
    demo.add_argument("--judge-mode", default=None, choices=["binary", "prob", "describe_prob"])
    demo.add_argument("--out", default=None, help="folder for the PNGs")
    demo.set_defaults(func=_demo)
    conf = sub.add_parser("config", help="print the resolved config as YAML (or its JSON schema) and exit")
    conf.add_argument("config", nargs="?", default=None, help="YAML config (default: all defaults)")
    conf.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4")
    conf.add_argument("--schema", action="store_true", help="print the config tree's JSON schema instead")
    conf.add_argument("--commented", action="store_true", help="print it with every field's doc as a comment")
    conf.set_defaults(func=_config)
    _add_optional(sub)
    return ap


def _config(args: argparse.Namespace) -> int:
    """`unigap config [FILE] [k=v ...]`: what a run would use, checked (a bad key fails here)."""
    import json

    from pipelines.config import Config, dump_config, load_config
    from pipelines.typed_config import commented_yaml

    if args.schema:
        print(json.dumps(Config.model_json_schema(), indent=1))
        return 0
    cfg = load_config(args.config, args.overrides)
    print(commented_yaml(cfg) if args.commented else dump_config(cfg), end="")
    return 0


def _add_optional(sub) -> None:
    """Subcommands owned by other modules, listed only where their module exists; each module's
    `add_cli(sub)` declares its own arguments."""
    import importlib
    import importlib.util

    for module in ("shapes.evaluate", "pipelines.driver", "pipelines.compare", "serve.app"):
        if importlib.util.find_spec(module.split(".")[0]) and importlib.util.find_spec(module):
            importlib.import_module(module).add_cli(sub)


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "func", None):
        ap.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # config, input and checkpoint errors: one clear line
        print(f"unigap {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
