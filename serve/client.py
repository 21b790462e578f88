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
from dataclasses import dataclass, field, fields
from typing import Optional, Union

import httpx
from PIL import Image


class UnigapHTTPError(Exception):
    """The server answered 4xx/5xx. `field` names the offending request field when it is one."""

    def __init__(self, status: int, message: str, field: Optional[str] = None):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message, self.field = status, message, field


@dataclass
class GeneratedImage:
    b64_png: str
    score: Optional[float]  # own-judge score in [0, 1]; None when the judge's answer was unparseable
    valid: bool
    seed: int  # the per-sample seed the model drew this image with
    index: int  # candidate index: image `index` of (request seed, round) -- reproducible

    def png(self) -> bytes:
        return base64.b64decode(self.b64_png)

    def image(self) -> Image.Image:
        return Image.open(io.BytesIO(self.png())).convert("RGB")


@dataclass
class GenerationResponse:
    id: str
    round: int
    seed: int
    n: int
    best_of: Optional[int]
    cfg_weight: float
    mode: str
    images: list[GeneratedImage] = field(default_factory=list)


@dataclass
class JudgeResponse:
    id: str
    round: int
    score: Optional[float]
    answer: str
    valid: bool
    mode: str


def _known(cls, data: dict) -> dict:
    # Fields a newer server adds are ignored, so an older client keeps working.
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


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

    def health(self) -> dict:
        return self._call("GET", "/healthz")

    def generate(self, prompt: str, n: int = 1, seed: Optional[int] = None, cfg_weight: Optional[float] = None,
                 best_of: Optional[int] = None, round: Optional[int] = None) -> GenerationResponse:
        body = {"prompt": prompt, "n": n, "seed": seed, "cfg_weight": cfg_weight, "best_of": best_of,
                "round": round}
        data = self._call("POST", "/v1/images/generations", {k: v for k, v in body.items() if v is not None})
        images = [GeneratedImage(**_known(GeneratedImage, im)) for im in data.pop("images")]
        return GenerationResponse(**_known(GenerationResponse, data), images=images)

    def judge(self, prompt: str, image: Union[Image.Image, bytes], round: Optional[int] = None) -> JudgeResponse:
        body = {"prompt": prompt, "image": encode_image(image)}
        if round is not None:
            body["round"] = round
        return JudgeResponse(**_known(JudgeResponse, self._call("POST", "/v1/judge", body)))
