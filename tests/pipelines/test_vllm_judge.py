"""audit.backend=vllm: the Janus-Pro-7B vLLM variant's Qwen2.5-VL judge validates without a GPU; the vLLM
output rows are read by the same yes/no parser as the HTTP judge; no vLLM -> a clear error."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from PIL import Image

from pipelines.audit import make_external_judge
from pipelines.config import ConfigError, load_config
from pipelines.http_judge import ExternalJudgeError, VLLMJudge, verdict_of, vllm_verdict_of

REPO = Path(__file__).resolve().parents[2]


def test_the_7b_vllm_variant_names_a_qwen_vllm_judge_whose_ray_config_validates():
    cfg = load_config(REPO / "configs" / "janus_pro_7b_vllm.yaml")
    judge = make_external_judge(cfg.audit)
    assert isinstance(judge, VLLMJudge) and "Qwen2.5-VL" in judge.model
    pc = judge.processor_config()  # Ray's pydantic model: a bad field raises here, in CI
    assert type(pc).__name__ == "vLLMEngineProcessorConfig"
    assert pc.model_source == cfg.audit.vlm_path and pc.concurrency == cfg.audit.vllm_replicas
    assert pc.engine_kwargs["max_model_len"] == cfg.audit.vllm_max_model_len
    assert pc.engine_kwargs["tensor_parallel_size"] == cfg.audit.vllm_tensor_parallel_size
    assert pc.prepare_multimodal_stage  # the image goes through ray.data.llm's multimodal stage
    scaled = make_external_judge(load_config(REPO / "configs" / "janus_pro_7b_vllm.yaml", [
        "audit.vllm_replicas=2", "audit.vllm_tensor_parallel_size=4", "audit.vllm_accelerator=H100"]).audit)
    spc = scaled.processor_config()
    assert spc.concurrency == 2 and spc.engine_kwargs["tensor_parallel_size"] == 4 and spc.accelerator_type == "H100"


def test_vllm_backend_needs_a_checkpoint():
    with pytest.raises(ConfigError, match="audit.vlm_path"):
        load_config(None, ["audit.backend=vllm"])
    with pytest.raises(ConfigError, match="vllm_replicas"):
        load_config(None, ["audit.backend=vllm", "audit.vlm_path=x", "audit.vllm_replicas=0"])


def test_vllm_rows_read_like_chat_completions():
    lp = {11: {"logprob": -0.1, "rank": 1, "decoded_token": " Yes"},
          12: {"logprob": -2.5, "rank": 2, "decoded_token": "No"}}
    assert vllm_verdict_of({"generated_text": " Yes", "logprobs": [lp]}) is True
    flipped = {11: {"logprob": -2.5, "decoded_token": "Yes"}, 12: {"logprob": -0.1, "decoded_token": "No"}}
    assert vllm_verdict_of({"generated_text": "Yes", "logprobs": [flipped]}) is False  # log-probs win over text
    assert vllm_verdict_of({"generated_text": "No, it shows a square"}) is False
    assert vllm_verdict_of({"generated_text": "maybe", "logprobs": None}) is None  # counted, never a "no"
    assert vllm_verdict_of({"generated_text": "yes"}) == verdict_of({"choices": [{"message": {"content": "yes"}}]})


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM installed: the GPU check runs it")
def test_without_vllm_the_judge_says_what_is_missing():
    judge = VLLMJudge("Qwen/Qwen2.5-VL-7B-Instruct")
    with pytest.raises(ExternalJudgeError, match=r"unigap\[vllm\]"):
        judge.verdicts([Image.new("RGB", (8, 8))], ["a red circle"])
    assert judge.verdicts([], []) == []
