"""OpenAI-compatible chat completions for the understanding branch: request checks and response shape.

Where it fits: `serve/deployment.py` routes `POST /v1/chat/completions` and `GET /v1/models` here, so
any OpenAI client (the `openai` package, `ray.data.llm`'s HTTP processor, curl) can ask a unigap
checkpoint about an image. What is supported, and refused with a 4xx naming the field otherwise:
  * `model`: "unigap" (the run's promoted round) or "round-<k>" (GET /v1/models lists them);
  * `messages`: optional system message(s) (text), then exactly one user message whose content is
    one text part and one `image_url` part (a `data:image/...;base64,` URI: the server fetches no URLs);
    no assistant turns (one question about one image);
  * `max_tokens` / `max_completion_tokens` in [1, MAX_TOKENS]; `temperature` absent or 0 and `n`
    absent or 1 (answers are greedy); `logprobs` / `top_logprobs` (the latter <= 2);
  * anything else in the body is refused (a typo must not be silently ignored), except the
    fields OpenAI clients commonly send and that change nothing here (`stream: false`, `user`).
The rules are the pydantic model `serve.api_models.ChatCompletionRequest` (also in GET /openapi.json).
The answer is the model's greedy text (`JanusUnified.answer`). With `logprobs: true` the first answer
token also carries `top_logprobs` for "Yes" and "No" from one forward pass (`p_yes`: P(Yes) and
P(No) renormalised over the two, the score the prob judge uses), so a client can read a calibrated
yes/no score instead of parsing text.

Example:
    >>> from serve.validation import Limits
    >>> img = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ"
    ...        "/pLvAAAAAElFTkSuQmCC")
    >>> body = {"model": "round-2", "messages": [{"role": "user", "content": [
    ...     {"type": "text", "text": "Is there a red circle?"}, {"type": "image_url", "image_url": {"url": img}}]}]}
    >>> r = parse_chat(body, Limits(64, 4, 8))
    >>> r.question, r.round, r.image.size, r.logprobs
    ('Is there a red circle?', 2, (1, 1), False)
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional

from serve.api_models import MAX_TOKENS, MODEL_NAME, ChatCompletion, ChatCompletionRequest, ModelCard, ModelList
from serve.validation import Limits, check, decode_image


@dataclass
class ChatRequest:
    question: str
    image: Any  # PIL image
    system: Optional[str]
    round: Optional[int]  # None: the promoted round
    max_tokens: int
    logprobs: bool
    model: str


def parse_chat(data: dict, limits: Limits) -> ChatRequest:
    """A checked ChatRequest (the rules: serve.api_models.ChatCompletionRequest), or RequestError."""
    req = check(ChatCompletionRequest, data, limits)
    return ChatRequest(req.question(), decode_image(req.image_url()), req.system(), req.round(),
                       req.max_tokens or req.max_completion_tokens or MAX_TOKENS, bool(req.logprobs), req.model)


def chat_response(req: ChatRequest, answer: str, p_yes: Optional[float], round_: int) -> ChatCompletion:
    """The OpenAI chat.completion object for one answer."""
    choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": answer},
                              "finish_reason": "stop", "logprobs": None}
    if req.logprobs and p_yes is not None and not math.isnan(p_yes):
        lp = {"Yes": math.log(max(p_yes, 1e-30)), "No": math.log(max(1.0 - p_yes, 1e-30))}
        first = "Yes" if p_yes >= 0.5 else "No"
        choice["logprobs"] = {"content": [{"token": first, "logprob": lp[first], "bytes": list(first.encode()),
                                           "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())}
                                                            for t, v in sorted(lp.items(), key=lambda x: -x[1])]}]}
    return ChatCompletion(id=f"chatcmpl-{uuid.uuid4().hex[:24]}", created=int(time.time()),
                          model=f"round-{round_}" if req.model != MODEL_NAME else MODEL_NAME, choices=[choice],
                          system_fingerprint=f"unigap-round-{round_}")  # no `usage`: tokens are not counted


def models_response(rounds: list[int]) -> ModelList:
    """GET /v1/models: the promoted alias and every round with an adapter (round-0 = the base)."""
    return ModelList(data=[ModelCard(id=i) for i in [MODEL_NAME] + [f"round-{k}" for k in sorted(rounds)]])
