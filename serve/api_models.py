"""The HTTP contract of `unigap serve` as pydantic v2 models: every route's request and response.

Where it fits: `serve/validation.py` checks a request body against these models (then maps the first
problem to a `RequestError` naming the field); `serve/deployment.py` declares them on its routes, so
GET /openapi.json (and the /docs page) documents exactly what the code checks; `serve/client.py`
builds its requests and reads the answers with the same classes.

Requests are strict: JSON `true` is not an integer, `"2"` is not 2, NaN / Infinity are refused,
unknown fields are refused (a typo must not be silently ignored), every number and list is bounded.
Limits that come from the run's `serve:` config (max prompt length, max n, max best_of) are checked
when a `Limits` is passed as the validation context; without one (the client) only the fixed bounds
apply. Responses ignore fields they do not know, so an older client reads a newer server.

Example:
    >>> from serve.validation import Limits
    >>> GenerationRequest.model_validate({"prompt": " a red circle ", "n": 2}).prompt
    'a red circle'
    >>> try:
    ...     GenerationRequest.model_validate({"prompt": "a red circle", "n": 9}, context=Limits(64, 4, 8))
    ... except Exception as e:
    ...     print(e.errors()[0]["msg"])
    n must be <= 4 (serve.max_n), got 9
"""

from __future__ import annotations

import base64
import io
import re
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from pipelines.schemas import prompt_text_problem

MAX_SEED = 2**63 - 1
MAX_CFG_WEIGHT = 20.0  # as the config's generate.cfg_weight
MAX_ROUND = 10**6
MAX_TOKENS = 64  # chat answers are short
MODEL_NAME = "unigap"  # the chat `model` that means "the run's promoted round"
MAX_MESSAGES = 16
ERROR_KIND = "unigap"  # the type of the errors these validators raise (messages meant for the client)


def refuse(message: str, field: Optional[str] = None) -> PydanticCustomError:
    """A validation error whose message reaches the client as it is; `field` names the request field
    when a model-level check raises it (a field validator's error already carries its field)."""
    return PydanticCustomError(ERROR_KIND, message, {"field": field} if field else None)


def _limits(info: ValidationInfo):
    return info.context if info.context is not None and hasattr(info.context, "max_n") else None


def _check_text(value: str, what: str, field: Optional[str] = None) -> str:
    # Line breaks are fine in chat messages, not in a prompt.
    problem = prompt_text_problem(value.replace("\n", " ").replace("\t", " ") if what != "prompt" else value)
    if problem:  # e.g. a lone surrogate the tokenizer cannot encode, or a NUL for the log
        raise refuse(f"{what} {problem}", field)
    return value.strip()


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, frozen=True)


class _Response(BaseModel):
    model_config = ConfigDict(extra="ignore")


# --------------------------------------------------------------------------- image generation

class GenerationRequest(_Request):
    """POST /v1/images/generations."""

    prompt: str = Field(description="What to draw (no control characters; at most serve.max_prompt_chars).")
    n: int = Field(1, ge=1, le=1024, description="Images to return (at most serve.max_n).")
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED,
                                description="Request seed; absent: the server draws one and returns it.")
    cfg_weight: Optional[float] = Field(None, ge=1.0, le=MAX_CFG_WEIGHT,
                                        description="Classifier-free guidance (1 = none); absent: the run's.")
    best_of: Optional[int] = Field(None, ge=1, le=4096,
                                   description="Sample this many and return the n the own judge scores highest "
                                               "(at most serve.max_best_of; >= n).")
    round: Optional[int] = Field(None, ge=0, le=MAX_ROUND,
                                 description="Which round's adapter (0 = base); absent: the promoted round.")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str, info: ValidationInfo) -> str:
        return _prompt(v, info)

    @model_validator(mode="after")
    def _bounds(self, info: ValidationInfo) -> "GenerationRequest":
        lim = _limits(info)
        if lim is not None and self.n > lim.max_n:
            raise refuse(f"n must be <= {lim.max_n} (serve.max_n), got {self.n}", "n")
        if lim is not None and self.best_of is not None and self.best_of > lim.max_best_of:
            raise refuse(f"best_of must be <= {lim.max_best_of} (serve.max_best_of), got {self.best_of}", "best_of")
        if self.best_of is not None and self.best_of < self.n:
            raise refuse(f"best_of must be >= n ({self.n}), got {self.best_of}", "best_of")
        return self


def _prompt(v: str, info: ValidationInfo) -> str:
    if not v.strip():
        raise refuse("prompt must not be empty")
    lim = _limits(info)
    if lim is not None and len(v) > lim.max_prompt_chars:
        raise refuse(f"prompt has {len(v)} characters; the limit is {lim.max_prompt_chars} (serve.max_prompt_chars)")
    return _check_text(v, "prompt")


class GeneratedImage(_Response):
    b64_png: str = Field(description="The image, base64 PNG.")
    score: Optional[float] = Field(description="Own-judge score in [0, 1]; null when its answer was unparseable.")
    valid: bool
    seed: int = Field(description="The per-sample seed the model drew this image with.")
    index: int = Field(description="Candidate index: image `index` of (request seed, round); reproducible.")

    def png(self) -> bytes:
        return base64.b64decode(self.b64_png)

    def image(self):
        from PIL import Image

        return Image.open(io.BytesIO(self.png())).convert("RGB")


class GenerationResponse(_Response):
    id: str
    round: int
    seed: int
    n: int
    best_of: Optional[int]
    cfg_weight: float
    mode: str = Field(description="The own judge's mode (binary or prob).")
    images: list[GeneratedImage] = Field(default_factory=list, description="Best first when best_of is set.")


# --------------------------------------------------------------------------- own judge

class JudgeRequest(_Request):
    """POST /v1/judge: the served model's own verdict on an image for a prompt."""

    prompt: str = Field(description="The prompt the image should show.")
    image: str = Field(description="Base64 PNG / JPEG / WEBP (a data: URI is fine); at most 4 MiB, 2048x2048.")
    round: Optional[int] = Field(None, ge=0, le=MAX_ROUND, description="Which round judges; absent: the promoted.")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str, info: ValidationInfo) -> str:
        return _prompt(v, info)


class JudgeResponse(_Response):
    id: str
    round: int
    score: Optional[float] = Field(description="In [0, 1]; null when the answer was unparseable (valid=false).")
    answer: str
    valid: bool
    mode: str


# --------------------------------------------------------------------------- health, errors

class HealthResponse(_Response):
    status: str
    round: int = Field(description="The round served by default (the promoted one; 0 = base).")
    rounds: list[int]
    batching: bool
    replica: str
    stats: dict[str, float] = Field(default_factory=dict)


class ErrorBody(_Response):
    """Every 4xx / 5xx answer."""

    error: str = Field(description="One line naming the problem.")
    field: Optional[str] = Field(description="The offending request field (or header, body, api_key).")
    status: int
    id: str = Field(description="The request id (in the server log next to a 500's cause).")


# --------------------------------------------------------------------------- OpenAI-compatible chat

class ImageURL(_Request):
    url: str = Field(description="A data:image/...;base64, URI (the server fetches no URLs).")
    detail: Optional[Literal["auto", "low", "high"]] = None


class _Part(_Request):
    @model_validator(mode="before")
    @classmethod
    def _nulls_are_absent(cls, data: Any) -> Any:
        # Batch clients that carry messages through Arrow (ray.data.llm) give every part the union of
        # the part keys, the other kind's set to null: {"type": "text", "text": ..., "image_url": null}.
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class TextPart(_Part):
    type: Literal["text"]
    text: str = Field(max_length=100_000)


class ImagePart(_Part):
    type: Literal["image_url"]
    image_url: ImageURL


class ChatMessage(_Request):
    role: Literal["system", "developer", "user"] = Field(description="No assistant turns: one question, one image.")
    content: Union[str, list[Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]]] = Field(
        description="system: text; user: one text part and one image_url part.")
    name: Optional[str] = None


class ChatCompletionRequest(_Request):
    """POST /v1/chat/completions: one question about one image, answered by the understanding branch."""

    model: str = Field(description=f"{MODEL_NAME!r} (the promoted round) or 'round-<k>' (GET /v1/models).")
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: Optional[int] = Field(None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: Optional[int] = Field(None, ge=1, le=MAX_TOKENS)
    temperature: Optional[float] = Field(None, ge=0, le=0, description="Answers are greedy: 0 or absent.")
    n: Optional[int] = Field(None, ge=1, le=1)
    logprobs: Optional[bool] = Field(None, description="true: the first token's logprobs for Yes and No.")
    top_logprobs: Optional[int] = Field(None, ge=0, le=2)
    stream: Optional[bool] = Field(None, description="false or absent (answers are short).")
    user: Optional[str] = Field(None, max_length=256)

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        if v != MODEL_NAME and not re.fullmatch(r"round-([0-9]{1,7})", v):
            raise refuse(f"model must be {MODEL_NAME!r} or 'round-<k>' (GET /v1/models), got {v[:40]!r}")
        return v

    @field_validator("stream")
    @classmethod
    def _stream(cls, v: Optional[bool]) -> Optional[bool]:
        if v:
            raise refuse("stream is not supported (answers are short; set stream to false)")
        return v

    @model_validator(mode="after")
    def _one_question(self, info: ValidationInfo) -> "ChatCompletionRequest":
        users = [m for m in self.messages if m.role == "user"]
        if len(users) != 1:
            raise refuse(f"exactly one user message is supported, got {len(users)}", "messages")
        content = users[0].content
        kinds = sorted(p.type for p in content) if isinstance(content, list) else []
        if kinds != ["image_url", "text"]:
            raise refuse("the user message's content must be one text part and one image_url part", "messages")
        if not self.image_url().startswith("data:image/"):
            raise refuse("image_url.url must be a data:image/...;base64, URI (URLs are not fetched)", "messages")
        for m in self.messages:
            if m.role != "user":
                _check_text(_text_of(m.content), "system message", "messages")
        question = _check_text(_text_of(content), "question", "messages")
        lim = _limits(info)
        if lim is not None and len(question) > lim.max_prompt_chars:
            raise refuse(f"the question has {len(question)} characters; the limit is {lim.max_prompt_chars} "
                         "(serve.max_prompt_chars)", "messages")
        return self

    def _user(self) -> ChatMessage:
        return next(m for m in self.messages if m.role == "user")

    def question(self) -> str:
        return _text_of(self._user().content).strip()

    def image_url(self) -> str:
        return next(p.image_url.url for p in self._user().content if isinstance(p, ImagePart))

    def system(self) -> Optional[str]:
        texts = [_text_of(m.content).strip() for m in self.messages if m.role != "user"]
        return "\n".join(texts) or None

    def round(self) -> Optional[int]:
        return None if self.model == MODEL_NAME else int(self.model[len("round-"):])


def _text_of(content: Union[str, list]) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.text for p in content if isinstance(p, TextPart))


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(_Response):
    content: list[TokenLogprob]


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: Optional[ChoiceLogprobs] = None


class ChatCompletion(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    system_fingerprint: str


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "unigap"


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """`model`'s JSON schema with its `$defs` substituted in place (an OpenAPI requestBody may not point
    into a `$defs` of its own)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def sub(node):
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return sub(defs[ref[len("#/$defs/"):]])
            return {k: sub(v) for k, v in node.items()}
        return [sub(v) for v in node] if isinstance(node, list) else node

    return sub(schema)


ERRORS = {code: {"model": ErrorBody, "description": why} for code, why in (
    (400, "malformed JSON"), (401, "missing or wrong API key"), (408, "body not received in time"),
    (413, "body or image too large"), (415, "not application/json"), (422, "a field missing, mistyped, out of "
    "range or unknown (`field` names it)"), (500, "internal error (the cause is in the server log)"),
    (503, "the round's adapter cannot be loaded"))}


def documented(request_model: type[BaseModel]) -> dict[str, Any]:
    """FastAPI route kwargs for the OpenAPI page: the request body schema (the body itself is read and
    checked by serve/validation.py, so its 4xx answers keep their one shape) and the error answers."""
    return {"responses": ERRORS, "openapi_extra": {"requestBody": {"required": True, "content": {
        "application/json": {"schema": inline_schema(request_model)}}}}}
