"""Request checking for the Serve HTTP API: raw body -> typed request, or a 4xx naming the field.

Where it fits: `serve/deployment.py` calls `parse_json_body`, then `parse_generation`, `parse_judge`
or `serve.chat.parse_chat`, before anything touches the model; a bad request costs microseconds and
can never reach `generate_images` (whose own ValueErrors would otherwise surface as 500s).

The field rules are the pydantic models of serve/api_models.py (strict: JSON `true` is not an
integer, `"2"` is not 2, NaN / Infinity refused, unknown fields refused), validated with the run's
`serve:` limits as context; this module adds what a model cannot see (content type, body size, JSON
depth, the image bytes, the routing header) and turns the first problem into one
`RequestError(status, message, field)`:
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
    >>> for bad in ({"prompt": "a red circle", "n": 9}, {"prompt": "a red circle", "n": "2"}):
    ...     try:
    ...         parse_generation(bad, limits)
    ...     except RequestError as e:
    ...         print(e.status, e.field, e.message)
    422 n n must be <= 4 (serve.max_n), got 9
    422 n n should be a valid integer, got '2'
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from dataclasses import dataclass
from typing import Any, Optional

from PIL import Image
from pydantic import BaseModel, ValidationError

from serve.api_models import ERROR_KIND, MAX_ROUND, GenerationRequest, JudgeRequest

MAX_BODY_BYTES = 8 * 1024 * 1024  # a max-size image as base64 (4/3 larger) plus the prompt
MAX_IMAGE_BYTES = 4 * 1024 * 1024
MAX_IMAGE_PIXELS = 2048 * 2048  # checked from the header, before decoding (decompression bombs)
SHOW_CHARS = 40  # of a bad value, quoted in an error message
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
MULTIPLEX_HEADER = "serve_multiplexed_model_id"  # Ray Serve's model-multiplexing routing header


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
class JudgeCall:
    """A checked POST /v1/judge: the prompt, the decoded image, the requested round."""

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


def check(model: type[BaseModel], data: dict, limits: Optional[Limits] = None) -> Any:
    """`model` validated from `data` with the run's limits, or a 422 RequestError naming the field."""
    try:
        return model.model_validate(data, context=limits)
    except ValidationError as e:
        raise request_error(model, e) from None


def request_error(model: type[BaseModel], exc: ValidationError) -> RequestError:
    """The first problem of a pydantic ValidationError as a 422 (an unknown field first: a typo is the
    likelier cause of a 'missing' one); the field is the top-level key."""
    errors = sorted(exc.errors(include_url=False), key=lambda e: e["type"] != "extra_forbidden")
    err = errors[0]
    loc = [str(x) for x in err["loc"]]
    field = ((err.get("ctx") or {}).get("field") or (loc[0] if loc else "body"))[:SHOW_CHARS]
    where = ".".join(loc) or "body"
    if err["type"] == "extra_forbidden":
        message = f"unknown field {_show(loc[-1])} (allowed: {', '.join(model.model_fields)})"
    elif err["type"] == "missing":
        message = f"{where} is required"
    elif err["type"] == ERROR_KIND:
        message = err["msg"]
    else:  # pydantic's "Input should be ..." said of the field, with what was sent
        message = f"{where} {err['msg'].replace('Input ', '', 1)}, got {_show(err.get('input'))}"
    return RequestError(422, message, field)


def parse_generation(data: dict, limits: Limits, header_round: Optional[str] = None) -> GenerationRequest:
    """A checked GenerationRequest (serve/api_models.py), or RequestError."""
    req = check(GenerationRequest, data, limits)
    return req.model_copy(update={"round": _round(req.round, header_round)})


def parse_judge(data: dict, limits: Limits, header_round: Optional[str] = None) -> JudgeCall:
    """A checked judge request with the image decoded, or RequestError."""
    req = check(JudgeRequest, data, limits)
    return JudgeCall(req.prompt, decode_image(req.image), _round(req.round, header_round))


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


def _round(body_round: Optional[int], header: Optional[str]) -> Optional[int]:
    """The requested round: the body field, else Serve's multiplexing header; they must agree."""
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
