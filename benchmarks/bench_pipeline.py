"""Driver memory of a round's data stages: rows streamed from the workers to storage vs collected.

What it measures: --prompts synthetic prompts x 1 image of the tiny random model go through
generate + self-judge (one fused actor pool, 2 actors) and the pool stage, in a fresh process per
setting on a fresh local Ray (2 CPUs); each process reports the driver's peak RSS (ru_maxrss), the
wall time and the rows that arrived. The prompts are held as the driver holds a run's prompts, an
Arrow prompt table. Settings, side by side in one run, for each prompt count:
  stream    what the driver runs today: `pipelines.rounds.generate / judge / pool`. The actors write
            the rows (Parquet part files) into the run store; the driver reads the key columns
            (exactly-once check), the Nonunified counts and the pool stage's columns without the PNGs,
            a range of 2048 prompts at a time (`pipelines.chunks`).
  collect   the code before streaming: `pipelines.stages.generate_table` collects every row
            (PNG included) on the driver, which writes it to the store and pools it (pools, SFT
            set, DPO pairs, discard pool: the stream setting's pool work, on one frame).
  baseline  a process that imports the same modules, starts Ray and does nothing else.
Both settings check that every row arrives exactly once. The tiny model's PNGs are ~100 bytes
(32 px) and its tokens 16 per image, so the collect/stream ratio here is a floor: at Janus-Pro's
384 px PNGs (~100-200 kB) the collected table is ~1000x larger per row, the streamed one is not.

With --nodes 2 the same runs go to a local two-node cluster (a head and a worker node, 1 CPU each,
`tests/cluster/localcluster.py`); the driver joins it, the actors spread over both nodes, and the
table says on how many nodes the rows were generated.

Run: OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_pipeline.py [--prompts 5000 50000] [--nodes 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, os, resource, sys, time
from types import SimpleNamespace
import pyarrow as pa
import ray
from pipelines import pools as P, rounds
from pipelines.config import config_from_dict
from pipelines.stages import generate_table
from pipelines.store import RunStore
mode, n, root, address = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
if address:  # a running cluster (--nodes 2): its nodes were started with OMP_NUM_THREADS=1
    ray.init(address=address, log_to_driver=False)
else:
    ray.init(num_cpus=2, object_store_memory=512 * 1024**2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
ray.data.DataContext.get_current().enable_progress_bars = False
cfg = config_from_dict({"model": {"path": "tiny", "device": "cpu"}, "prompts": {"source": "prompts.jsonl"},
                        "audit": {"backend": "vlm", "vlm_path": "unused"}, "pools": {"review_sample": 0},
                        "generate": {"num_images": 1, "batch_size": 250, "num_actors": 2},
                        "judge": {"mode": "prob", "batch_size": 250, "fused": True}})
colours, shapes = ["red", "green", "blue", "yellow"], ["circle", "square", "triangle"]
def part(lo, hi):  # the prompts as the driver keeps them: a prompt table (pipelines.prompts.prompt_table)
    return pa.table({"prompt_id": [f"p{i:06d}" for i in range(lo, hi)], "category": ["single"] * (hi - lo),
                     "prompt": [f"a {colours[i % 4]} {shapes[i % 3]} number {i}" for i in range(lo, hi)]})
prompts = pa.concat_tables([part(lo, min(lo + 10000, n)) for lo in range(0, max(n, 1), 10000)])
store = RunStore(root, mode)
store.init(cfg)
t0 = time.perf_counter()
rows = 0
if mode == "stream":
    ctx = SimpleNamespace(cfg=cfg, store=store)
    gen, _ = rounds.generate(ctx, prompts, 1, None)
    judged, _ = rounds.judge(ctx, gen, 1, None, prompts)
    pooled, _ = rounds.pool(ctx, 1, judged, prompts)
    rows = pooled.counts["samples"]
elif mode == "collect":
    df = generate_table(prompts, cfg, round_=1, judge=True)  # checks the count
    assert df[["prompt_id", "sample_index"]].duplicated().sum() == 0
    store.write_table(1, "generate", df)
    pooled = P.assign_pools(df, cfg.pools.accept_threshold, cfg.pools.reject_threshold)
    store.write_table(1, "pool", pooled)
    sft = P.sft_set(pooled, cfg.pools.sft_select, cfg.pools.best_of_n_keep_above, cfg.pools.category_cap)
    pairs = P.dpo_pairs(pooled, cfg.pairs.strategy, cfg.pairs.margin, cfg.pairs.max_pairs_per_prompt, seed=0)
    discard = P.discard_pool(pooled)  # the same pool work as the stream setting's pool stage, on one frame
    rows = len(pooled)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
nodes = store.read_table(1, "generate", columns=["node_id"]).column("node_id").unique().to_pylist() if n else []
print(json.dumps({"mode": mode, "prompts": n, "rows": rows, "seconds": round(time.perf_counter() - t0, 1),
                  "peak_rss_mib": peak, "nodes": len(nodes)}))
"""


def run(mode: str, n: int, root: str, cluster=None) -> dict:
    env = {**(cluster.env if cluster else os.environ), "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(n), root, cluster.gcs if cluster else ""], env=env,
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{mode} {n} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, nargs="+", default=[5000, 50000])
    ap.add_argument("--nodes", type=int, choices=[1, 2], default=1,
                    help="2: a local two-node cluster (head and worker, 1 CPU each; tests/cluster/localcluster.py)")
    args = ap.parse_args()
    res = {}
    cluster = None
    if args.nodes == 2:
        sys.path.insert(0, os.getcwd())
        from tests.cluster.localcluster import start_two_nodes

        cluster = start_two_nodes(f"/tmp/ugb-{os.getpid()}", head_cpus=1, worker_cpus=1, object_store_mib=256,
                                  env={"PYTHONPATH": os.getcwd()})
    try:
        with tempfile.TemporaryDirectory() as tmp:
            base = run("baseline", 0, os.path.join(tmp, "b"), cluster)["peak_rss_mib"]
            for n in args.prompts:
                for mode in ("stream", "collect"):
                    r = run(mode, n, os.path.join(tmp, f"{mode}{n}"), cluster)
                    assert r["rows"] == n, r
                    res[(mode, n)] = r
    finally:
        if cluster:
            cluster.stop()
    print(f"baseline (imports + Ray, no rows): peak RSS {base:.0f} MiB; {args.nodes} node(s)")
    print("| prompts x 1 image | setting | seconds | driver peak RSS MiB | above baseline MiB | nodes that generated |")
    print("|---:|---|---:|---:|---:|---:|")
    for (mode, n), r in sorted(res.items(), key=lambda kv: (kv[0][1], kv[0][0] != "stream")):
        print(f"| {n} | {mode} | {r['seconds']} | {r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] - base:.0f} "
              f"| {r['nodes']} |")
    for n in args.prompts:
        s, c = res[("stream", n)]["peak_rss_mib"] - base, res[("collect", n)]["peak_rss_mib"] - base
        print(f"{n} prompts: collect / stream, driver RSS above baseline: x{c / max(s, 1):.2f}")
    if len(args.prompts) > 1:
        lo, hi = min(args.prompts), max(args.prompts)
        for mode in ("stream", "collect"):
            a, b = res[(mode, lo)]["peak_rss_mib"] - base, res[(mode, hi)]["peak_rss_mib"] - base
            print(f"{mode}: driver RSS above baseline grows x{b / max(a, 1):.2f} from {lo} to {hi} prompts")


if __name__ == "__main__":
    main()
