"""Serve test fixtures: one real local Serve app per test module on the tiny model (serve_helpers.py
builds its run dir); `serve.shutdown()` at the module's end."""

from __future__ import annotations

import os

import httpx
import pytest

from serve.client import UnigapClient
from tests.serve.serve_helpers import KEY, KEY_ENV, free_port, make_run


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory):
    from ray import serve

    from serve.app import build_app

    os.environ[KEY_ENV] = KEY
    run_dir = make_run(str(tmp_path_factory.mktemp("serve_runs")))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"run_dir": run_dir, "num_cpus": 0.5}), name="unigap-test", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    try:
        yield {"url": url, "run_dir": run_dir, "client": UnigapClient(url, api_key=KEY, timeout=120)}
    finally:
        serve.shutdown()
        os.environ.pop(KEY_ENV, None)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server["url"], timeout=120, trust_env=False) as c:
        yield c
