"""Shared by the Serve test modules: the test run dir (two adapters, a corrupt third, `best` -> 1, an
API key), a free port and image helpers. The Serve app fixtures that use them are in conftest.py."""

from __future__ import annotations

import base64
import io
import os
import shutil
import socket

import numpy as np
import torch
from PIL import Image

from pipelines.config import load_config
from pipelines.store import RunStore
from serve.client import encode_image

KEY_ENV, KEY = "UNIGAP_TEST_SERVE_KEY", "test-key-123"
PROMPT = "a red circle"
THRESHOLD = 0.5
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_run(root: str) -> str:
    """A run dir with adapters for rounds 1, 2 (and a corrupt 3), `best` -> 1, as the driver leaves it."""
    from models.lora import LoraSpec, attach_lora, save_adapter
    from models.tiny import build_tiny

    cfg = load_config(os.path.join(REPO, "configs", "tiny.yaml"), [
        f"run.root={root}", "run.name=served", f"serve.api_key_env={KEY_ENV}", "serve.min_replicas=1",
        "serve.max_replicas=1", "serve.max_n=4", "serve.max_best_of=8", "serve.max_prompt_chars=64",
        f"serve.contradiction_threshold={THRESHOLD}", "serve.max_batch_size=8", "serve.batch_wait_timeout_s=0.1"])
    store = RunStore(root, "served")
    store.init(cfg)
    for k in (1, 2):
        m = attach_lora(build_tiny(), LoraSpec(r=4))
        g = torch.Generator().manual_seed(k)
        with torch.no_grad():  # fresh LoRA B is zero (a no-op): make each round really different
            for name, p in m.model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        save_adapter(m, store.adapter_dir(k))
    # Round 3: a copy of round 2 with its weights tampered after the checksum was written.
    shutil.copytree(store.adapter_dir(2), store.adapter_dir(3))
    with open(os.path.join(store.adapter_dir(3), "adapter_model.safetensors"), "r+b") as fh:
        fh.seek(-8, os.SEEK_END)
        fh.write(b"\x00" * 8)
    store.set_pointer("best", 1)
    return store.uri


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def png_b64(size=(32, 32)) -> str:
    return encode_image(Image.new("RGB", size, (200, 30, 30)))
