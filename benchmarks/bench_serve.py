"""Serve load benchmark: closed-loop clients against a local app, dynamic batching on vs off.

Where it fits: checks the claim behind `@serve.batch` in serve/deployment.py -- that grouping
concurrent requests into one `generate_images` + one judge call raises throughput. Starts its own
local Ray + Serve on 127.0.0.1 (never another host), builds a throwaway run dir (tiny model unless
--model), deploys one app per setting side by side (batching on with each --batch-wait, and off;
one replica each, so batching is measured, not autoscaling), and for each concurrency runs C
closed-loop clients (asyncio + httpx; a client sends its next request when the previous answer
arrives) until --requests answers or --duration seconds, whichever comes first. Settings are
measured interleaved, in alternating order per repeat, because the shared box's load drifts.

Output: one line per measurement (throughput req/s, p50/p99 latency ms, errors, mean batch size and
model-busy share read from /healthz), then medians over repeats and the batching speed-up at the
highest concurrency; `--json PATH` also writes the rows.

Example:
    $ OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_serve.py --clients 1 4 16 --repeats 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a yellow circle above a red square"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_run(root: str, args: argparse.Namespace) -> str:
    """A run dir whose config fixes one replica (batching is measured, not autoscaling)."""
    from pipelines.config import load_config
    from pipelines.store import RunStore

    cfg = load_config(str(REPO / "configs" / "tiny.yaml"), [
        f"run.root={root}", "run.name=bench", f"model.path={args.model}", "serve.min_replicas=1",
        "serve.max_replicas=1", f"serve.max_batch_size={args.max_batch_size}",
        "serve.api_key_env=null"])
    store = RunStore(root, "bench")
    store.init(cfg)
    return store.uri


async def closed_loop(url: str, clients: int, max_requests: int, duration: float, n: int) -> dict:
    """C clients, each sending its next request when the previous one is answered."""
    import httpx

    latencies: list[float] = []
    errors = 0
    sent = 0
    deadline = time.perf_counter() + duration

    async def one_client(cid: int, http: httpx.AsyncClient) -> None:
        nonlocal errors, sent
        while sent < max_requests and time.perf_counter() < deadline:
            i = sent
            sent += 1
            body = {"prompt": PROMPTS[i % len(PROMPTS)], "n": n, "seed": i}
            t0 = time.perf_counter()
            try:
                r = await http.post("/v1/images/generations", json=body)
                ok = r.status_code == 200 and len(r.json()["images"]) == n
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, trust_env=False, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(one_client(c, http) for c in range(clients)))
        wall = time.perf_counter() - t0
    lat = sorted(latencies)
    def pct(q):
        return 1000 * lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")
    return {"clients": clients, "ok": len(lat), "errors": errors, "wall_s": round(wall, 2),
            "throughput_rps": round(len(lat) / wall, 2), "p50_ms": round(pct(0.50), 1),
            "p99_ms": round(pct(0.99), 1), "mean_ms": round(1000 * statistics.fmean(lat), 1) if lat else None}


def _stats(url: str) -> dict:
    import httpx

    return httpx.get(url + "/healthz", trust_env=False, timeout=30).json()["stats"]


def deploy(url: str, run_dir: str, wait: float | None, args: argparse.Namespace) -> str:
    """Deploy one setting as its own app (wait None = batching off); returns its base URL."""
    from ray import serve

    from serve.app import build_app

    name = "off" if wait is None else f"wait{int(wait * 1000)}ms"
    overrides = [] if wait is None else [f"serve.batch_wait_timeout_s={wait}"]
    # 0.5 CPU each: all settings fit the 2-CPU Ray at once; an idle replica costs no CPU.
    app = build_app({"run_dir": run_dir, "batching": wait is not None, "num_cpus": 0.5, "overrides": overrides})
    serve.run(app, name=name, route_prefix=f"/{name}")
    base = f"{url}/{name}"
    asyncio.run(closed_loop(base, 4, 3 * args.max_batch_size, 30, args.n))  # warm-up: imports, caches
    return base


def measure(base: str, wait: float | None, clients: int, rep: int, args: argparse.Namespace) -> dict:
    before = _stats(base)
    row = {"batching": wait is not None, "batch_wait_s": wait, "rep": rep,
           **asyncio.run(closed_loop(base, clients, args.requests, args.duration, args.n))}
    after = _stats(base)
    calls = after["model_calls"] - before["model_calls"]
    row["mean_batch"] = round((after["requests"] - before["requests"]) / max(1, calls), 2)
    row["model_busy"] = round((after["model_s"] - before["model_s"]) / row["wall_s"], 2)
    label = "off" if wait is None else f"on, wait {wait:.2f} s"
    print(f"rep {rep} batching={label:<16} clients={clients:>3}  {row['throughput_rps']:>7.2f} req/s  "
          f"p50 {row['p50_ms']:>7.1f} ms  p99 {row['p99_ms']:>7.1f} ms  ok {row['ok']:>4}  errors {row['errors']}  "
          f"mean batch {row['mean_batch']:>5.2f}  model busy {row['model_busy']:.0%}  ({row['wall_s']} s)", flush=True)
    return row


def summarize(rows: list[dict], clients: list[int]) -> dict:
    """Median over repeats per (setting, clients); speed-up of each batched setting at the top load."""
    table = {}
    for r in rows:
        table.setdefault((r["batch_wait_s"], r["clients"]), []).append(r)
    print("\nmedian over repeats:")
    med = {}
    for (wait, c), rs in table.items():
        med[(wait, c)] = {k: statistics.median(r[k] for r in rs)
                          for k in ("throughput_rps", "p50_ms", "p99_ms", "mean_batch")}
        m = med[(wait, c)]
        print(f"  {'off' if wait is None else f'on, wait {wait:.2f} s':<16} clients={c:>3}  "
              f"{m['throughput_rps']:>7.2f} req/s  "
              f"p50 {m['p50_ms']:>7.1f} ms  p99 {m['p99_ms']:>7.1f} ms  mean batch {m['mean_batch']:.2f}  "
              f"errors {sum(r['errors'] for r in rs)}")
    top = max(clients)
    speedups = {w: round(med[(w, top)]["throughput_rps"] / max(med[(None, top)]["throughput_rps"], 1e-9), 2)
                for (w, c) in med if w is not None and c == top}
    for w, x in speedups.items():
        print(f"batching speed-up at {top} clients, wait {w:.2f} s: {x:.2f}x (goal >= 3x)")
    print(f"errors in all settings: {sum(r['errors'] for r in rows)} (goal 0)")
    return {str(w): x for w, x in speedups.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=200, help="answers per measurement (upper bound)")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per measurement (upper bound)")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved repeats (the box's load drifts)")
    ap.add_argument("--n", type=int, default=1, help="images per request")
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--batch-wait", type=float, nargs="+", default=[0.05, 0.15],
                    help="serve.batch_wait_timeout_s values to measure with batching on")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import ray
    from ray import serve

    tmp = tempfile.mkdtemp(prefix="unigap-bench-")
    ray_tmp = f"/tmp/ubench-{os.getpid()}"  # short: Ray's unix socket paths have a length cap
    ray.init(num_cpus=2, object_store_memory=256 * 1024**2, include_dashboard=False, log_to_driver=False,
             _temp_dir=ray_tmp, runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}})
    rows: list[dict] = []
    try:
        run_dir = make_run(tmp, args)
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
        settings = [(w, deploy(url, run_dir, w, args)) for w in [*args.batch_wait, None]]
        for rep in range(args.repeats):
            for c in args.clients:
                order = settings if rep % 2 == 0 else settings[::-1]  # alternate: drift hits both arms
                rows += [measure(base, w, c, rep, args) for w, base in order]
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    speedups = summarize(rows, args.clients)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "speedup": speedups, "load": os.getloadavg(),
                                               "args": vars(args)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
