"""External VLM judges run as `ray.data.llm` stages: an OpenAI-compatible endpoint, or vLLM engines.

Where it fits: `audit.backend: openai_http` (`pipelines.audit.make_external_judge`). On real models
the audit's judge is a large VLM served apart from the job (vLLM, SGLang, Ray Serve LLM, or another
`unigap serve`), shared across jobs; Ray ships the batch client for it, `ray.data.llm`'s
`HttpRequestProcessorConfig` (batching, concurrency, QPS limits and retries are its, not ours).
Each (image, prompt) becomes one request: the prob judge's question (`models.base.PROB_QUESTION`)
with the image as a `data:image/png;base64,` URI, `logprobs: true, top_logprobs: 2`.

Verdict of one answer: P(Yes) from the Yes/No top log-probs when the server returns them
(renormalised over the two; `unigap serve` does), else the answer text's first word (yes / no).
Anything else -- an HTTP error body, no choices, an answer that is neither -- is *unparseable*: it is
counted, never silently scored "no"; more than `max_unparseable` of a batch raises
`ExternalJudgeError` naming the endpoint and an example, and an endpoint that cannot be reached
fails the stage with ray.data.llm's retry error.

`audit.backend: vllm` runs the same question in vLLM engines inside the job instead
(`VLLMJudge`: `vLLMEngineProcessorConfig`, one engine per `audit.vllm_replicas` on GPU nodes, the
image prepared by ray.data.llm's multimodal stage, greedy, top-2 log-probs), and reads the verdict
with the same parser (`vllm_verdict_of` maps vLLM's output row onto the chat.completion shape). It
needs the `vllm` extra, installed on GPU nodes only: without it `verdicts` raises
`ExternalJudgeError` naming the extra, before any engine starts.

Example (a unigap serve of another checkpoint as the judge):
    from pipelines.http_judge import OpenAIHTTPJudge
    judge = OpenAIHTTPJudge("http://127.0.0.1:8000/v1/chat/completions", model="round-3", api_key_env="KEY")
    judge.verdicts(images, prompts)       # -> [True, False, ...]
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Optional

from PIL import Image

from models.base import PROB_QUESTION
from serve.client import encode_image  # the PNG -> base64 the HTTP routes take


class ExternalJudgeError(RuntimeError):
    """The external judge's endpoint answered in a way no verdict can be read from."""


def verdict_of(response: Any) -> Optional[bool]:
    """True / False from one chat.completion JSON, or None when it cannot be read (module docstring).

    >>> verdict_of({"choices": [{"message": {"content": "Yes, it does."}}]})
    True
    >>> ans = {"message": {"content": "No"}, "logprobs": {"content": [{"top_logprobs": [
    ...     {"token": "No", "logprob": -0.9}, {"token": "Yes", "logprob": -0.5}]}]}}
    >>> verdict_of({"choices": [ans]}), verdict_of({"error": "model not found"})
    (True, None)
    """
    try:
        choice = response["choices"][0]
    except (KeyError, IndexError, TypeError):
        return None
    try:
        top = {t["token"].strip().lower(): t["logprob"] for t in choice["logprobs"]["content"][0]["top_logprobs"]}
        if "yes" in top and "no" in top:
            y, n = math.exp(top["yes"]), math.exp(top["no"])
            return y / max(y + n, 1e-300) >= 0.5
    except (KeyError, IndexError, TypeError, AttributeError):
        pass
    text = ((choice.get("message") or {}).get("content") or "") if isinstance(choice, dict) else ""
    word = re.match(r"\W*(\w+)", text.lower()) if isinstance(text, str) else None
    return {"yes": True, "no": False}.get(word.group(1)) if word else None


class OpenAIHTTPJudge:
    """`verdicts(images, prompts)` through an OpenAI-compatible `/v1/chat/completions` endpoint."""

    def __init__(self, url: str, model: str, api_key_env: Optional[str] = None, concurrency: int = 1,
                 qps: Optional[int] = None, max_retries: int = 2, batch_size: int = 16,
                 max_unparseable: float = 0.0):
        self.url, self.model = url, model
        self.name = f"openai_http:{model}@{url}"
        key = os.environ.get(api_key_env or "", "") if api_key_env else ""
        if api_key_env and not key:
            raise ValueError(f"audit.http_api_key_env={api_key_env!r} but ${api_key_env} is not set")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.concurrency, self.qps, self.max_retries = concurrency, qps, max_retries
        self.batch_size, self.max_unparseable = batch_size, max_unparseable
        self.unparseable = 0  # over the judge's lifetime, for the caller's metrics

    def verdicts(self, images: list[Image.Image], prompts: list[str]) -> list[bool]:
        import ray
        from ray.data.llm import HttpRequestProcessorConfig, build_processor

        rows = _request_rows(images, prompts)
        if not rows:
            return []
        model = self.model
        config = HttpRequestProcessorConfig(url=self.url, headers=self.headers, concurrency=self.concurrency,
                                            qps=self.qps, max_retries=self.max_retries, batch_size=self.batch_size)
        processor = build_processor(
            config,
            preprocess=lambda r: {"i": r["i"], "payload": {
                "model": model, "max_tokens": 4, "logprobs": True, "top_logprobs": 2,
                "messages": [{"role": "user", "content": [
                    {"type": "text", "text": PROB_QUESTION.format(prompt=r["prompt"])},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + r["png"]}}]}]}},
            postprocess=lambda r: {"i": r["i"], "verdict": _code(verdict_of(r["http_response"])),
                                   "raw": str(r["http_response"])[:200]},
        )
        return _collect(self, processor(ray.data.from_items(rows)).take_all(), len(rows))


def vllm_verdict_of(row: dict) -> Optional[bool]:
    """`verdict_of` for one row of ray.data.llm's vLLM stage (`generated_text`, and `logprobs`: per
    generated token {token_id: {"logprob", "rank", "decoded_token"}}).

    >>> vllm_verdict_of({"generated_text": "no", "logprobs": [{7: {"logprob": -0.2, "decoded_token": "Yes"},
    ...                                                       9: {"logprob": -1.7, "decoded_token": " No"}}]})
    True
    >>> vllm_verdict_of({"generated_text": "No."}), vllm_verdict_of({"generated_text": ""})
    (False, None)
    """
    top = []
    try:
        top = [{"token": str(v.get("decoded_token") or ""), "logprob": float(v["logprob"])}
               for v in (row.get("logprobs") or [{}])[0].values() if v is not None]
    except (AttributeError, KeyError, TypeError, ValueError, IndexError):
        pass
    choice = {"message": {"content": row.get("generated_text") or ""},
              "logprobs": {"content": [{"top_logprobs": top}]}}
    return verdict_of({"choices": [choice]})


class VLLMJudge:
    """`verdicts(images, prompts)` by a VLM in vLLM engines run by ray.data.llm inside the job."""

    def __init__(self, model: str, replicas: int = 1, tensor_parallel_size: int = 1, max_model_len: int = 8192,
                 accelerator: Optional[str] = None, batch_size: int = 16, max_unparseable: float = 0.0):
        if not model:
            raise ValueError("audit.backend=vllm needs audit.vlm_path (the judge VLM's checkpoint)")
        self.model, self.replicas, self.tensor_parallel_size = model, replicas, tensor_parallel_size
        self.max_model_len, self.accelerator, self.batch_size = max_model_len, accelerator, batch_size
        self.max_unparseable, self.unparseable = max_unparseable, 0
        self.name = f"vllm:{model}"

    def processor_config(self):
        """The `vLLMEngineProcessorConfig` this judge runs (validated by Ray's pydantic model; no vLLM needed)."""
        from ray.data.llm import vLLMEngineProcessorConfig

        return vLLMEngineProcessorConfig(
            model_source=self.model, concurrency=self.replicas, batch_size=self.batch_size,
            accelerator_type=self.accelerator, prepare_multimodal_stage={"enabled": True},
            engine_kwargs={"max_model_len": self.max_model_len, "tensor_parallel_size": self.tensor_parallel_size,
                           "limit_mm_per_prompt": {"image": 1}})

    def verdicts(self, images: list[Image.Image], prompts: list[str]) -> list[bool]:
        import importlib.util

        import ray
        from ray.data.llm import build_processor

        rows = _request_rows(images, prompts)
        if not rows:
            return []
        if importlib.util.find_spec("vllm") is None:
            raise ExternalJudgeError(f"{self.name}: audit.backend=vllm needs vLLM on the GPU nodes "
                                     "(pip install 'unigap[vllm]'); this environment has none")
        processor = build_processor(
            self.processor_config(),
            preprocess=lambda r: {"i": r["i"], "sampling_params": {"temperature": 0.0, "max_tokens": 4, "logprobs": 2},
                                  "messages": [{"role": "user", "content": [
                                      {"type": "image_url", "image_url": {"url": "data:image/png;base64," + r["png"]}},
                                      {"type": "text", "text": PROB_QUESTION.format(prompt=r["prompt"])}]}]},
            postprocess=lambda r: {"i": r["i"], "verdict": _code(vllm_verdict_of(r)),
                                   "raw": str(r.get("generated_text"))[:200]},
        )
        return _collect(self, processor(ray.data.from_items(rows)).take_all(), len(rows))


def _request_rows(images: list[Image.Image], prompts: list[str]) -> list[dict]:
    """One row per (image, prompt): index, prompt and the image as base64 PNG."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    return [{"i": i, "prompt": p, "png": encode_image(im.convert("RGB"))}
            for i, (im, p) in enumerate(zip(images, prompts))]


def _collect(judge, out: list[dict], expected: int) -> list[bool]:
    """Verdicts in request order; unparseable answers counted, and fatal above `judge.max_unparseable`."""
    out = sorted(out, key=lambda r: r["i"])
    if len(out) != expected:
        raise ExternalJudgeError(f"{judge.name}: {expected} requests, {len(out)} answers")
    bad = [r for r in out if r["verdict"] < 0]
    judge.unparseable += len(bad)
    if len(bad) > judge.max_unparseable * len(out):
        raise ExternalJudgeError(f"{judge.name}: {len(bad)} of {len(out)} answers carry no yes/no verdict "
                                 f"(e.g. {bad[0]['raw']!r})")
    return [r["verdict"] == 1 for r in out]  # tolerated unparseable answers count as "no", and are counted


def _code(v: Optional[bool]) -> int:
    return -1 if v is None else int(v)
