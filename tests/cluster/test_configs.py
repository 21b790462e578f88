"""The GPU run configs (configs/janus_pro_1b.yaml, configs/janus_pro_7b.yaml): they load, mirror the
config tree 1:1 like the shipped ones, and say what a GPU run needs.

Example:
    $ .venv/bin/python -m pytest tests/cluster/test_configs.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipelines.config import flatten_config, load_config

REPO = Path(__file__).resolve().parents[2]
GPU_CONFIGS = {"janus_pro_1b.yaml": "deepseek-community/Janus-Pro-1B",
               "janus_pro_7b.yaml": "deepseek-community/Janus-Pro-7B"}


@pytest.mark.parametrize("name", sorted(GPU_CONFIGS))
def test_gpu_config_loads_and_mirrors_the_tree(name):
    cfg = load_config(REPO / "configs" / name)
    raw = yaml.safe_load((REPO / "configs" / name).read_text())
    listed = {f"{s}.{k}" for s, sec in raw.items() for k in sec}
    leaves = {".".join(k.split(".")[:2]) for k in flatten_config(cfg)}
    assert listed == leaves  # every field listed, nothing extra
    assert (cfg.model.path, cfg.model.dtype, cfg.model.device) == (GPU_CONFIGS[name], "bfloat16", "cuda")
    assert cfg.train.use_gpu and cfg.train.precision == "bf16"
    assert 0 < cfg.generate.num_gpus_per_actor <= 1 and 0 < cfg.judge.num_gpus_per_actor <= 1
    assert cfg.prompts.source.endswith(".jsonl")
    assert cfg.audit.backend == "vlm" and cfg.audit.vlm_path == "Qwen/Qwen2.5-VL-7B-Instruct"


def test_7b_shards_over_more_workers_than_1b():
    small, big = (load_config(REPO / "configs" / n) for n in sorted(GPU_CONFIGS))
    assert (small.train.strategy, big.train.strategy) == ("ddp", "fsdp")
    assert big.train.num_workers > small.train.num_workers


def test_gpu_config_on_a_cluster_takes_a_shared_run_root():
    cfg = load_config(REPO / "configs" / "janus_pro_1b.yaml",
                      ["run.root=s3://bucket/unigap/runs", "prompts.source=s3://bucket/unigap/prompts.jsonl"])
    assert cfg.run.root.startswith("s3://") and cfg.prompts.source.startswith("s3://")
