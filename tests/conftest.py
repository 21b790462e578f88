"""Shared pytest setup: one local Ray per test session, and quiet single-threaded torch.

At import (before any test imports ray or torch does work):
  * OMP_NUM_THREADS=1, torch.set_num_threads(1): on the contended 2-core CI box torch's default
    threading makes tiny-model ops 4-17x slower (shared STACK-NOTES.md §8).
  * RAY_DATA_DISABLE_PROGRESS_BARS=1; RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.2 (Train V2 polls workers
    every 2 s by default; the driver propagates this variable to the controller and the workers, so
    fit() ends and failed workers are noticed sooner). Both are `setdefault`: the environment wins.

Fixture `ray_session` (session scope): starts Ray ONCE for the whole session and shuts it down at the
end. Request it in any test (or module-scoped fixture) that needs Ray; mark such tests
`@pytest.mark.ray`. It yields the Ray temp dir (logs under `<dir>/session_latest/logs`).
    ray.init(num_cpus=2, object_store_memory=300 MiB, no dashboard, log_to_driver=False,
             _temp_dir=/tmp/unigap-ray-<pid> (short: Ray's unix sockets cap the path length),
             runtime_env env_vars: OMP_NUM_THREADS=1, PYTHONPATH=<repo root> (so workers and
             actors import models/, trainers/, pipelines/ from this checkout), and the Serve proxy
             guard's variables (serve.guard.proxy_env, body deadline GUARD_BODY_TIMEOUT_S))
If Ray is already initialised (someone called ray.init first), it is reused and left running.

Example:
    import pytest

    @pytest.mark.ray
    def test_something(ray_session):
        import ray
        assert ray.get(ray.put(1)) == 1
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
GUARD_BODY_TIMEOUT_S = 3.0  # the Serve proxy guard's body deadline in tests (serve/guard.py)

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

import torch  # noqa: E402  (after OMP_NUM_THREADS)

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray for the whole test session (see the module docstring)."""
    import ray

    if ray.is_initialized():
        yield None
        return
    from serve.guard import proxy_env

    temp_dir = f"/tmp/unigap-ray-{os.getpid()}"
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    # Serve proxies started in this session run the HTTP guard with a short body deadline (as
    # `unigap serve` does with serve.body_timeout_s): set before Ray starts, which its processes inherit.
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath, **proxy_env(body_timeout_s=GUARD_BODY_TIMEOUT_S)}
    os.environ.update(proxy_env(body_timeout_s=GUARD_BODY_TIMEOUT_S))
    ray.init(num_cpus=2, object_store_memory=300 * 1024**2, include_dashboard=False, log_to_driver=False,
             _temp_dir=temp_dir, runtime_env={"env_vars": env})
    try:
        yield temp_dir
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
