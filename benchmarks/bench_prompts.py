"""Peak memory of reading a large prompt file: the streaming reader vs reading the file whole.

What it measures: a JSONL prompt file of --mb megabytes (default 220: ~1.5 M rows, the size that took
2.56 GB when read whole, issue 14) is read in a fresh process per setting, and each process reports
its peak RSS (ru_maxrss) and wall time. Settings, side by side in one run:
  whole      the old reader's pattern: the whole file decoded to one string, split into lines, every
             line parsed, then cleaned (kept only as a reference for the ratio)
  stream     `pipelines.prompts.load_prompts(path)`: streamed, every good row kept
  stream-10k `load_prompts(path, limit=10000)`: reading stops at the limit
  baseline   a process that imports the same modules and reads nothing
Peak RSS of the stream setting still grows with the rows it *keeps* (the training prompt list is
held in memory); with a limit it stays near the baseline whatever the file size.

Run: OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_prompts.py [--mb 220]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, resource, sys, time
from pipelines.prompts import load_prompts, _clean, PromptReport
mode, path = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
kept = 0
if mode == "whole":
    report = PromptReport()
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    records = [json.loads(l) for l in lines if l.strip()]
    rows = [r for r in (_clean(x, "", "train", 64, lambda t: len(t.split()), report) for x in records) if r]
    kept = len(rows)
elif mode == "stream":
    rows, report = load_prompts(path, max_tokens=64)
    kept = len(rows)
elif mode == "stream-10k":
    rows, report = load_prompts(path, max_tokens=64, limit=10000)
    kept = len(rows)
print(json.dumps({"kept": kept, "seconds": time.perf_counter() - t0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

COLOURS, SHAPES = ["red", "green", "blue", "yellow", "purple", "orange"], ["circle", "square", "triangle", "star"]


def write_file(path: str, mb: int) -> int:
    """A JSONL file of about `mb` MiB of shapes-like prompts with unique ids; returns the row count."""
    rows, size, target = 0, 0, mb * 1024**2
    with open(path, "w", encoding="utf-8") as fh:
        while size < target:
            c, s = COLOURS[rows % 6], SHAPES[(rows // 6) % 4]
            line = json.dumps({"id": f"p{rows:08d}", "prompt": f"a {c} {s} to the left of a "
                               f"{COLOURS[(rows // 24) % 6]} {SHAPES[(rows // 144) % 4]} number {rows}",
                               "category": "spatial", "split": "train"})
            fh.write(line + "\n")
            size += len(line) + 1
            rows += 1
    return rows


def measure(mode: str, path: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", CHILD, mode, path], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=220)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "prompts.jsonl")
        t0 = time.perf_counter()
        n = write_file(path, args.mb)
        size_mb = os.path.getsize(path) / 1024**2
        print(f"file: {size_mb:.0f} MiB, {n} rows (written in {time.perf_counter() - t0:.0f} s)")
        results = {m: measure(m, path) for m in ("baseline", "stream-10k", "stream", "whole")}
    base = results["baseline"]["peak_rss_mb"]
    print("\n| setting | rows kept | peak RSS (MiB) | over baseline (MiB) | vs whole | seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    whole = results["whole"]["peak_rss_mb"] - base
    for m, r in results.items():
        over = r["peak_rss_mb"] - base
        ratio = f"x{over / whole:.2f}" if m != "baseline" else "-"
        print(f"| {m} | {r['kept']} | {r['peak_rss_mb']:.0f} | {over:.0f} | {ratio} | {r['seconds']:.1f} |")
    print(f"\nrusage of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
