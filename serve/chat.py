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
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional

from serve.validation import Limits, RequestError, _show, decode_image

MODEL_NAME = "unigap"
MAX_TOKENS = 64
CHAT_FIELDS = ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "n", "logprobs",
               "top_logprobs", "stream", "user")


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
    """A checked ChatRequest (module docstring), or RequestError naming the field."""
    unknown = sorted(k for k in data if k not in CHAT_FIELDS)
    if unknown:
        raise RequestError(422, f"unknown field {_show(unknown[0])} (supported: {', '.join(CHAT_FIELDS)})",
                           str(unknown[0])[:40])
    model = data.get("model")
    if not isinstance(model, str):
        raise RequestError(422, f"model must be {MODEL_NAME!r} or 'round-<k>' (GET /v1/models)", "model")
    match = re.fullmatch(r"round-([0-9]{1,7})", model)
    if model != MODEL_NAME and not match:
        raise RequestError(422, f"model must be {MODEL_NAME!r} or 'round-<k>', got {_show(model)}", "model")
    if data.get("stream") not in (None, False):
        raise RequestError(422, "stream is not supported (answers are short; set stream to false)", "stream")
    if data.get("n") not in (None, 1):
        raise RequestError(422, f"n must be 1, got {_show(data.get('n'))}", "n")
    temp = data.get("temperature")
    if temp is not None and (isinstance(temp, bool) or not isinstance(temp, (int, float)) or temp != 0):
        raise RequestError(422, f"temperature must be 0 or absent (answers are greedy), got {_show(temp)}",
                           "temperature")
    max_tokens = MAX_TOKENS
    for name in ("max_tokens", "max_completion_tokens"):
        v = data.get(name)
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_TOKENS:
                raise RequestError(422, f"{name} must be an integer in [1, {MAX_TOKENS}], got {_show(v)}", name)
            max_tokens = v
    logprobs = data.get("logprobs")
    if logprobs not in (None, True, False):
        raise RequestError(422, f"logprobs must be a boolean, got {_show(logprobs)}", "logprobs")
    top = data.get("top_logprobs")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 2):
        raise RequestError(422, f"top_logprobs must be 0, 1 or 2 (Yes and No), got {_show(top)}", "top_logprobs")
    system, question, image = _messages(data.get("messages"), limits)
    return ChatRequest(question, image, system, int(match.group(1)) if match else None, max_tokens,
                       bool(logprobs), model)


def _messages(messages: Any, limits: Limits) -> tuple[Optional[str], str, Any]:
    if not isinstance(messages, list) or not messages:
        raise RequestError(422, "messages must be a non-empty list", "messages")
    system, user = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user"):
            raise RequestError(422, f"messages[{i}] must be a system or user message (one question about one "
                               "image; no assistant turns)", "messages")
        (user if m["role"] == "user" else system).append(m)
    if len(user) != 1:
        raise RequestError(422, f"exactly one user message is supported, got {len(user)}", "messages")
    texts = [_text(m.get("content"), "system message") for m in system]
    content = user[0].get("content")
    if not isinstance(content, list):
        raise RequestError(422, "the user message's content must be a list with one text part and one "
                           "image_url part", "messages")
    parts = {p.get("type"): p for p in content if isinstance(p, dict)}
    if len(content) != 2 or set(parts) != {"text", "image_url"}:
        raise RequestError(422, "the user message's content must be one text part and one image_url part",
                           "messages")
    question = _text(parts["text"].get("text"), "text part")
    if len(question) > limits.max_prompt_chars:
        raise RequestError(422, f"the question has {len(question)} characters; the limit is "
                           f"{limits.max_prompt_chars} (serve.max_prompt_chars)", "messages")
    url = ((parts["image_url"].get("image_url") or {}).get("url")
           if isinstance(parts["image_url"].get("image_url"), dict) else None)
    if not isinstance(url, str) or not url.startswith("data:image/"):
        raise RequestError(422, "image_url.url must be a data:image/...;base64, URI (URLs are not fetched)",
                           "messages")
    return ("\n".join(texts) or None), question, decode_image(url)


def _text(value: Any, what: str) -> str:
    from pipelines.schemas import prompt_text_problem

    if isinstance(value, list):  # content parts of type text
        value = "".join(p.get("text", "") for p in value if isinstance(p, dict) and p.get("type") == "text")
    if not isinstance(value, str):
        raise RequestError(422, f"the {what} must be text", "messages")
    problem = prompt_text_problem(value.replace("\n", " ").replace("\t", " "))  # line breaks are fine here
    if problem:
        raise RequestError(422, f"the {what} {problem}", "messages")
    return value.strip()


def chat_response(req: ChatRequest, answer: str, p_yes: Optional[float], round_: int) -> dict:
    """The OpenAI chat.completion object for one answer."""
    choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": answer},
                              "finish_reason": "stop", "logprobs": None}
    if req.logprobs and p_yes is not None and not math.isnan(p_yes):
        lp = {"Yes": math.log(max(p_yes, 1e-30)), "No": math.log(max(1.0 - p_yes, 1e-30))}
        first = "Yes" if p_yes >= 0.5 else "No"
        choice["logprobs"] = {"content": [{"token": first, "logprob": lp[first], "bytes": list(first.encode()),
                                           "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())}
                                                            for t, v in sorted(lp.items(), key=lambda x: -x[1])]}]}
    return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": f"round-{round_}" if req.model != MODEL_NAME else MODEL_NAME, "choices": [choice],
            "system_fingerprint": f"unigap-round-{round_}"}  # no `usage`: tokens are not counted


def models_response(rounds: list[int]) -> dict:
    """GET /v1/models: the promoted alias and every round with an adapter (round-0 = the base)."""
    ids = [MODEL_NAME] + [f"round-{k}" for k in sorted(rounds)]
    return {"object": "list", "data": [{"id": i, "object": "model", "created": 0, "owned_by": "unigap"} for i in ids]}
