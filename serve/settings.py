"""What a Serve replica needs to start, resolved once from the run's config by `serve.app.build_app`.

Where it fits: its own module so that the app builder (serve/app.py) and the deployment
(serve/deployment.py, which imports ray) both use it without importing each other.

Example:
    >>> from pipelines.config import load_config
    >>> server_settings("runs/x", load_config(None)).max_n
    4
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Optional

from pipelines.config import Config


@dataclass
class ServerSettings:
    """Everything a replica needs, resolved once by `build_app` (plain values: pickled to replicas)."""

    run_dir: str
    model_path: str
    dtype: str
    device: str
    judge_mode: Optional[str]  # None: the mode the checkpoint was trained for
    cfg_weight: float  # defaults for requests that do not set them (the run's generate: section)
    temperature: float
    top_k: Optional[int]
    max_prompt_chars: int
    max_n: int
    max_best_of: int
    contradiction_threshold: float
    batching: bool
    max_batch_size: int
    batch_wait_timeout_s: float
    api_key_env: Optional[str]
    body_timeout_s: float  # the replica's own body deadline (the proxy guard's, when it is installed)
    api_key_sha256: Optional[str]  # the driver's key, hashed: the plain key never leaves its process


def server_settings(run_dir: str, cfg: Config, model: Optional[str] = None, batching: bool = True) -> ServerSettings:
    s, g = cfg.serve, cfg.generate
    key_hash = None
    if s.api_key_env and os.environ.get(s.api_key_env):
        key_hash = hashlib.sha256(os.environ[s.api_key_env].encode()).hexdigest()
    return ServerSettings(
        run_dir=run_dir, model_path=model or cfg.model.path, dtype=cfg.model.dtype, device=cfg.model.device,
        judge_mode=cfg.judge.mode, cfg_weight=g.cfg_weight, temperature=g.temperature, top_k=g.top_k,
        max_prompt_chars=s.max_prompt_chars, max_n=s.max_n, max_best_of=s.max_best_of,
        contradiction_threshold=s.contradiction_threshold, batching=batching,
        max_batch_size=s.max_batch_size, batch_wait_timeout_s=s.batch_wait_timeout_s,
        api_key_env=s.api_key_env, api_key_sha256=key_hash, body_timeout_s=s.body_timeout_s)
