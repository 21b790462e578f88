"""Request checking for the Serve HTTP API: raw body -> typed request, or a 4xx naming the field.

Where it fits: `serve/deployment.py` calls `parse_json_body`, then `parse_generation` or
`parse_judge`, before anything touches the model; a bad request costs microseconds and can never
reach `generate_images` (whose own ValueErrors would otherwise surface as 500s).

Hand-written rather than pydantic: JSON `true` must not count as an integer, `"2"` must not be coerced
to 2, NaN / Infinity (which Python's json accepts) must be refused, and the limits come from the
run's `serve:` config at startup. Every problem is a `RequestError(status, message, field)`:
    400 malformed JSON, nested too deeply, or empty body
    413 body / image bytes / image pixels too large
    415 Content-Type not application/json
    422 a field missing, mistyped, out of range or unknown; a prompt that breaks the prompt text rule
        (`pipelines.schemas.prompt_text_problem`: no control characters, no surrogates)
Every number is bounded (cfg_weight in [1, MAX_CFG_WEIGHT], seeds < 2**63, rounds <= 10**6) and
messages quote at most SHOW_CHARS characters of what was sent.

Example:
    >>> limits = Limits(max_prompt_chars=64, max_n=4, max_best_of=8)
    >>> body = parse_json_body("application/json", b'{"prompt": "a red circle", "n": 2}')
    >>> parse_generation(body, limits).n
    2
    >>> try:
    ...     parse_generation({"prompt": "a red circle", "n": 9}, limits)
    ... except RequestError as e:
    ...     print(e.status, e.field, e.message)
    422 n n must be <= 4 (serve.max_n), got 9
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Optional

from PIL import Image

from pipelines.schemas import prompt_text_problem

MAX_BODY_BYTES = 8 * 1024 * 1024  # a max-size image as base64 (4/3 larger) plus the prompt
MAX_IMAGE_BYTES = 4 * 1024 * 1024
MAX_IMAGE_PIXELS = 2048 * 2048  # checked from the header, before decoding (decompression bombs)
MAX_SEED = 2**63 - 1
MAX_CFG_WEIGHT = 20.0  # as the config's generate.cfg_weight
MAX_ROUND = 10**6
SHOW_CHARS = 40  # of a bad value, quoted in an error message
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
MULTIPLEX_HEADER = "serve_multiplexed_model_id"  # Ray Serve's model-multiplexing routing header

GENERATION_FIELDS = ("prompt", "n", "seed", "cfg_weight", "best_of", "round")
JUDGE_FIELDS = ("prompt", "image", "round")


class RequestError(Exception):
    """A request the server refuses: HTTP `status`, a one-line `message`, the offending `field`."""

    def __init__(self, status: int, message: str, field: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field

    def body(self, request_id: str = "") -> dict:
        return {"error": self.message, "field": self.field, "status": self.status, "id": request_id}


@dataclass(frozen=True)
class Limits:
    """The `serve:` config limits a request is checked against."""

    max_prompt_chars: int
    max_n: int
    max_best_of: int


@dataclass
class GenerationRequest:
    prompt: str
    n: int
    seed: Optional[int]  # None: the server draws one and returns it
    cfg_weight: Optional[float]  # None: the run's generate.cfg_weight
    best_of: Optional[int]  # None: exactly n candidates, returned in sampling order
    round: Optional[int]  # None: the run's promoted `best` round


@dataclass
class JudgeRequest:
    prompt: str
    image: Image.Image
    round: Optional[int]


def parse_json_body(content_type: Optional[str], body: bytes) -> dict:
    """The JSON object in `body`, after the content-type and size checks."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media != "application/json":
        raise RequestError(415, f"Content-Type must be application/json, got {media or 'nothing'!r}",
                           "content-type")
    if len(body) > MAX_BODY_BYTES:
        raise RequestError(413, f"body is {len(body)} bytes; the limit is {MAX_BODY_BYTES}", "body")
    if not body.strip():
        raise RequestError(400, "body is empty; expected a JSON object", "body")
    try:
        data = json.loads(body)
    except RecursionError:
        raise RequestError(400, "body is nested too deeply", "body") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise RequestError(400, f"body is not valid JSON ({_show(str(e), 80)})", "body") from None
    if not isinstance(data, dict):
        raise RequestError(422, f"body must be a JSON object, got {type(data).__name__}", "body")
    return data


def parse_generation(data: dict, limits: Limits, header_round: Optional[str] = None) -> GenerationRequest:
    """A checked GenerationRequest (fields: see GENERATION_FIELDS), or RequestError."""
    _check_keys(data, GENERATION_FIELDS)
    prompt = _prompt(data, limits)
    n = _int(data, "n", 1, 1, limits.max_n, "serve.max_n")
    best_of = _int(data, "best_of", None, 1, limits.max_best_of, "serve.max_best_of")
    if best_of is not None and best_of < n:
        raise RequestError(422, f"best_of must be >= n ({n}), got {best_of}", "best_of")
    seed = _int(data, "seed", None, 0, MAX_SEED, "2**63-1")
    cfg = data.get("cfg_weight")
    if cfg is not None:
        if (isinstance(cfg, bool) or not isinstance(cfg, (int, float))
                or (isinstance(cfg, float) and not math.isfinite(cfg))):
            raise RequestError(422, f"cfg_weight must be a finite number, got {_show(cfg)}", "cfg_weight")
        if cfg < 1:  # 1.0 means "no guidance"; below it the guidance pushes away from the prompt
            raise RequestError(422, f"cfg_weight must be >= 1 (1 = no guidance), got {_show(cfg)}", "cfg_weight")
        if cfg > MAX_CFG_WEIGHT:  # compared before float(): a 400-digit int must not overflow
            raise RequestError(422, f"cfg_weight must be <= {MAX_CFG_WEIGHT}, got {_show(cfg)}", "cfg_weight")
        cfg = float(cfg)
    return GenerationRequest(prompt, n, seed, cfg, best_of, _round(data, header_round))


def parse_judge(data: dict, limits: Limits, header_round: Optional[str] = None) -> JudgeRequest:
    """A checked JudgeRequest with the image decoded (fields: see JUDGE_FIELDS), or RequestError."""
    _check_keys(data, JUDGE_FIELDS)
    prompt = _prompt(data, limits)
    if "image" not in data or data["image"] is None:
        raise RequestError(422, "image is required (a base64-encoded PNG)", "image")
    return JudgeRequest(prompt, decode_image(data["image"]), _round(data, header_round))


def decode_image(value: Any) -> Image.Image:
    """A base64 (optionally `data:image/...;base64,`) string -> a loaded RGB PIL image."""
    if not isinstance(value, str):
        raise RequestError(422, f"image must be a base64 string, got {type(value).__name__}", "image")
    if value.startswith("data:"):
        value = value.partition(",")[2]
    if len(value) > MAX_IMAGE_BYTES * 4 // 3 + 4:  # refuse before decoding a huge string
        raise RequestError(413, f"image is larger than {MAX_IMAGE_BYTES} bytes", "image")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(422, "image is not valid base64", "image") from None
    if not raw:
        raise RequestError(422, "image is empty", "image")
    try:
        im = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)  # lazy: reads the header only
    except Image.DecompressionBombError:  # the header announces a huge image
        raise RequestError(413, f"image is too large (over {MAX_IMAGE_PIXELS} pixels)", "image") from None
    except (OSError, ValueError):
        raise RequestError(422, f"image is base64 but not a {'/'.join(IMAGE_FORMATS)} image", "image") from None
    w, h = im.size
    if w * h > MAX_IMAGE_PIXELS:
        raise RequestError(413, f"image is {w}x{h} pixels; the limit is {MAX_IMAGE_PIXELS} pixels", "image")
    try:
        im.load()
    except (OSError, ValueError, SyntaxError):
        raise RequestError(422, "image data is truncated or corrupt", "image") from None
    return im.convert("RGB")


def _show(value: Any, limit: int = SHOW_CHARS) -> str:
    """`value` as quoted in a message: repr, cut to `limit` characters (a 400-digit number or a
    megabyte string is not echoed back)."""
    text = (repr(value) if not isinstance(value, int) or value.bit_length() < 128
            else f"<{value.bit_length()}-bit integer>")
    return text if len(text) <= limit else text[:limit] + "..."


def _check_keys(data: dict, allowed: tuple[str, ...]) -> None:
    # Unknown fields are refused: a typo ("best-of", "num_images") must not be silently ignored.
    unknown = sorted(k for k in data if k not in allowed)
    if unknown:
        bad = _show(unknown[0])
        raise RequestError(422, f"unknown field {bad} (allowed: {', '.join(allowed)})", unknown[0][:SHOW_CHARS])


def _prompt(data: dict, limits: Limits) -> str:
    if "prompt" not in data or data["prompt"] is None:
        raise RequestError(422, "prompt is required", "prompt")
    prompt = data["prompt"]
    if not isinstance(prompt, str):
        raise RequestError(422, f"prompt must be a string, got {type(prompt).__name__}", "prompt")
    if not prompt.strip():
        raise RequestError(422, "prompt must not be empty", "prompt")
    if len(prompt) > limits.max_prompt_chars:
        raise RequestError(422, f"prompt has {len(prompt)} characters; the limit is "
                           f"{limits.max_prompt_chars} (serve.max_prompt_chars)", "prompt")
    problem = prompt_text_problem(prompt)
    if problem:  # e.g. a lone surrogate the tokenizer cannot encode, or a NUL for the log
        raise RequestError(422, f"prompt {problem}", "prompt")
    return prompt.strip()


def _int(data: dict, name: str, default: Optional[int], lo: int, hi: int, hi_name: str) -> Optional[int]:
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):  # bool is an int subclass in Python
        raise RequestError(422, f"{name} must be an integer, got {_show(value)}", name)
    if value < lo:
        raise RequestError(422, f"{name} must be >= {lo}, got {_show(value)}", name)
    if value > hi:
        raise RequestError(422, f"{name} must be <= {hi} ({hi_name}), got {_show(value)}", name)
    return value


def _round(data: dict, header: Optional[str]) -> Optional[int]:
    """The requested round: the body field, else Serve's multiplexing header; they must agree."""
    body_round = _int(data, "round", None, 0, MAX_ROUND, "10**6")
    if header is None or header == "":
        return body_round
    if not re.fullmatch(r"[0-9]{1,7}", header.strip()) or int(header) > MAX_ROUND:  # ASCII digits only
        raise RequestError(422, f"{MULTIPLEX_HEADER} header must be a round number <= {MAX_ROUND}, got "
                           f"{_show(header)}", MULTIPLEX_HEADER)
    header_round = int(header)
    if body_round is not None and body_round != header_round:
        raise RequestError(422, f"round {body_round} in the body disagrees with {MULTIPLEX_HEADER}: "
                           f"{header_round}", "round")
    return header_round
