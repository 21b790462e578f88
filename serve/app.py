"""Serve a run's model over HTTP: the app builder, the `unigap serve` command, the contradiction log.

Where it fits: the last box of the round diagram (DESIGN.md §2). The driver promotes a round
(`best` pointer in the run manifest) and writes `adapters/round_<k>/`; this app serves the run's
base model with the promoted adapter by default, any round on request, and logs the images its own
judge disagrees with (`serve/contradictions.py`) for the driver's next round.

HTTP API (details and status codes: serve/deployment.py; typed client: serve/client.py):
    POST /v1/images/generations  {prompt, n=1, seed?, cfg_weight?, best_of?, round?}
                                 -> {id, round, seed, n, best_of, cfg_weight, mode,
                                     images: [{b64_png, score, valid, seed, index}]}
    POST /v1/judge               {prompt, image (base64 PNG), round?}
                                 -> {id, round, score, answer, valid, mode}
    GET  /healthz                -> {status, round, rounds, batching, replica}   (no model call)
    POST /v1/chat/completions    OpenAI-compatible: one question about one image (data URI), answered
                                 by the understanding branch; model "unigap" or "round-<k>"
                                 (serve/chat.py; the `openai` client works against it)
    GET  /v1/models              -> the OpenAI model list: "unigap" and "round-<k>" per adapter
    GET  /openapi.json, /docs    the schema of all of the above, generated from serve/api_models.py

Stable entry points (the RayService manifest in cluster/ and `serve deploy` use these):
    import_path: serve.app:build_app
    args: run_dir (required; local path, file://, s3:// or gs:// URI of a run directory),
          model (default: the run's model.path), config (a YAML replacing the run's config.yaml),
          overrides (list of dotted keys, e.g. ["serve.max_batch_size=16"]),
          batching (default true), num_cpus (per replica, default 1), num_gpus (default 0)
    serve/serve_config.yaml is a ready `serve deploy` / `serve run` file.

Inputs: a run directory made by the driver (manifest.json, config.yaml, adapters/round_<k>/).
Outputs: HTTP responses; <run>/contradictions/part-*.parquet.

Example (a local server on a run dir, then the client):
    $ unigap serve runs/shapes --port 8000          # blocks until Ctrl-C
    from serve.client import UnigapClient
    c = UnigapClient("http://127.0.0.1:8000")
    r = c.generate("a red circle", n=2, best_of=4, seed=0)
    print(r.round, [round(im.score, 2) for im in r.images])
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from pipelines.config import Config, config_from_dict, load_config
from serve.contradictions import contradiction_log_path, open_run, read_contradictions  # noqa: F401 (API)
from serve.settings import server_settings

APP_NAME = "unigap"
REPO_ROOT = Path(__file__).resolve().parent.parent


def resolve_config(run_dir: str, config: Optional[str] = None, overrides: tuple[str, ...] = ()) -> Config:
    """The run's own config.yaml (or `config`, when given) with dotted overrides applied."""
    if config:
        return load_config(config, list(overrides))
    store = open_run(run_dir)
    return config_from_dict(yaml.safe_load(store.read_bytes("config.yaml")) or {}, list(overrides))


def build_app(args: dict):
    """Ray Serve application builder (`serve.app:build_app`); `args` as in the module docstring."""
    args = dict(args or {})
    known = {"run_dir", "model", "config", "overrides", "batching", "num_cpus", "num_gpus"}
    unknown = sorted(set(args) - known)
    if unknown or "run_dir" not in args:
        raise ValueError(f"build_app args: need run_dir; unknown {unknown} (known: {sorted(known)})")
    run_dir = str(args["run_dir"])
    overrides = args.get("overrides") or ()
    cfg = resolve_config(run_dir, args.get("config"), tuple([overrides] if isinstance(overrides, str) else overrides))
    batching = args.get("batching", True)
    batching = batching if isinstance(batching, bool) else str(batching).lower() in ("1", "true", "yes")
    settings = server_settings(run_dir, cfg, args.get("model"), batching)
    from serve.deployment import UnigapServer  # imports ray: only when an app is actually built

    s = cfg.serve
    deployment = UnigapServer.options(
        num_replicas="auto",
        autoscaling_config={"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                            "initial_replicas": max(1, s.min_replicas),
                            "target_ongoing_requests": s.target_ongoing_requests},
        # Room for one full batch running while the next one fills (the config checks >= 2 batches);
        # stalled uploads never count here: serve/guard.py holds them at the proxy.
        max_ongoing_requests=s.max_ongoing_requests,
        ray_actor_options={"num_cpus": float(args.get("num_cpus", 1)), "num_gpus": float(args.get("num_gpus", 0))},
    )
    return deployment.bind(dataclasses.asdict(settings))


# ---------------------------------------------------------------------------------------- CLI

def add_cli(sub) -> None:
    """Register `unigap serve` (called by pipelines/cli.py; imports nothing heavy)."""
    p = sub.add_parser("serve", help="serve a run's model over HTTP with Ray Serve (blocks until Ctrl-C)")
    p.add_argument("run_dir", help="run directory (local path or s3:// / gs:// URI)")
    p.add_argument("--config", default=None, help="YAML config replacing the run's config.yaml")
    p.add_argument("--model", default=None, help="model path or hub id (default: the run's model.path)")
    p.add_argument("--host", default=None, help="bind address (default: serve.host, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default: serve.port)")
    p.add_argument("--no-batching", action="store_true", help="one model call per request")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, repeatable, e.g. --set serve.max_n=8")
    p.set_defaults(func=_serve_command)


def start_local(run_dir: str, *, host: str, port: int, app_args: dict, cfg: Config):
    """Start (or join) Ray and Serve, deploy the app, and return the base URL (non-blocking)."""
    import ray
    from ray import serve

    from serve.guard import CALLBACK_ENV, proxy_env

    if not ray.is_initialized():
        if cfg.ray.address:
            ray.init(address=cfg.ray.address)
            print(f"unigap serve: joined {cfg.ray.address}; its HTTP proxies guard slow and malformed requests "
                  f"only if that cluster was started with {CALLBACK_ENV}=serve.guard:proxy_middlewares "
                  "(serve/guard.py)", file=sys.stderr, flush=True)
        else:  # replicas import serve/, models/, pipelines/ from this checkout even if not installed
            pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
            # The proxy reads its middleware callback from its environment at start: set it before
            # Ray starts, so the processes Ray spawns (the proxy among them) inherit it.
            env = {"PYTHONPATH": pythonpath, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                   **proxy_env(cfg.serve.body_timeout_s)}
            os.environ.update(env)
            ray.init(num_cpus=cfg.ray.num_cpus, object_store_memory=cfg.ray.object_store_mb * 1024**2,
                     include_dashboard=False, runtime_env={"env_vars": env})
            from pipelines.reaper import start_reaper

            start_reaper()  # the local Ray we started goes with us, even after kill -9
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(app_args), name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}"


def _serve_command(args: argparse.Namespace) -> int:
    import signal

    overrides = tuple(args.overrides)
    cfg = resolve_config(args.run_dir, args.config, overrides)
    host, port = args.host or cfg.serve.host, args.port or cfg.serve.port
    app_args: dict[str, Any] = {"run_dir": args.run_dir, "model": args.model, "config": args.config,
                                "overrides": list(overrides), "batching": not args.no_batching,
                                "num_cpus": args.num_cpus, "num_gpus": args.num_gpus}
    try:
        url = start_local(args.run_dir, host=host, port=port, app_args=app_args, cfg=cfg)
        signal.signal(signal.SIGTERM, _interrupt)  # after ray.init, which installs its own handler
        print(f"unigap serve: {args.run_dir} at {url}  (POST /v1/images/generations, POST /v1/judge, "
              "GET /healthz; Ctrl-C stops)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("unigap serve: shutting down", flush=True)
    finally:
        import ray
        from ray import serve

        if ray.is_initialized():
            # On a shared cluster remove only our app; a local Ray we started goes entirely.
            serve.delete(APP_NAME) if cfg.ray.address else serve.shutdown()
            ray.shutdown()
    return 0


def _interrupt(signum, frame) -> None:
    """SIGTERM (Kubernetes, systemd, `kill`) shuts down as cleanly as Ctrl-C."""
    raise KeyboardInterrupt
