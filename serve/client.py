"""A small typed client for the unigap Serve API (serve/app.py lists the routes).

Where it fits: tests, benchmarks and anyone scripting against a running `unigap serve`. httpx with
`trust_env=False`, so an HTTP(S)_PROXY in the environment never reroutes calls to a local server.
Errors (4xx/5xx) raise `UnigapHTTPError(status, message, field)` with the server's message.

Example:
    from serve.client import UnigapClient
    with UnigapClient("http://127.0.0.1:8000", api_key=None, timeout=60) as c:
        r = c.generate("a red circle", n=2, best_of=4, seed=0)
        best = r.images[0].image()            # PIL image, decoded on request
        verdict = c.judge("a red circle", best)
        print(r.round, r.images[0].score, verdict.score)
"""

from __future__ import annotations

import base64
import io
from typing import Optional, Union

import httpx
from PIL import Image
from pydantic import BaseModel, ValidationError

from serve.api_models import (GeneratedImage, GenerationRequest, GenerationResponse, HealthResponse,  # noqa: F401
                              JudgeRequest, JudgeResponse, ModelList)
from serve.validation import request_error


class UnigapHTTPError(Exception):
    """The request was refused: the server answered 4xx/5xx, or (status 422, before sending) the
    request failed the same models the server checks with. `field` names the offending request field
    when it is one."""

    def __init__(self, status: int, message: str, field: Optional[str] = None):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message, self.field = status, message, field


def _request(model: type[BaseModel], **fields) -> dict:
    """The JSON body for `model`, checked with the server's own models (minus its config limits)."""
    try:
        req = model.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as e:
        err = request_error(model, e)
        raise UnigapHTTPError(err.status, err.message, err.field) from None
    return req.model_dump(exclude_none=True)


def encode_image(image: Union[Image.Image, bytes]) -> str:
    """PIL image or raw PNG/JPEG bytes -> base64 text for the `image` field."""
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        image = buf.getvalue()
    return base64.b64encode(image).decode()


class UnigapClient:
    def __init__(self, base_url: str, api_key: Optional[str] = None, timeout: float = 60.0):
        headers = {"x-api-key": api_key} if api_key else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout,
                                  trust_env=False)

    def __enter__(self) -> "UnigapClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, body: Optional[dict] = None) -> dict:
        r = self._http.request(method, path, json=body)
        if r.status_code >= 400:
            try:
                data = r.json()
                message, fld = data.get("error") or data.get("detail") or r.text, data.get("field")
            except ValueError:  # a proxy error page, not our JSON
                message, fld = r.text, None
            raise UnigapHTTPError(r.status_code, str(message), fld)
        return r.json()

    def health(self) -> HealthResponse:
        return HealthResponse.model_validate(self._call("GET", "/healthz"))

    def models(self) -> ModelList:
        return ModelList.model_validate(self._call("GET", "/v1/models"))

    def generate(self, prompt: str, n: int = 1, seed: Optional[int] = None, cfg_weight: Optional[float] = None,
                 best_of: Optional[int] = None, round: Optional[int] = None) -> GenerationResponse:
        body = _request(GenerationRequest, prompt=prompt, n=n, seed=seed, cfg_weight=cfg_weight, best_of=best_of,
                        round=round)
        return GenerationResponse.model_validate(self._call("POST", "/v1/images/generations", body))

    def judge(self, prompt: str, image: Union[Image.Image, bytes], round: Optional[int] = None) -> JudgeResponse:
        body = _request(JudgeRequest, prompt=prompt, image=encode_image(image), round=round)
        return JudgeResponse.model_validate(self._call("POST", "/v1/judge", body))
