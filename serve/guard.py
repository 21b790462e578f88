"""The HTTP guard in front of the app: slow, oversized or undecodable requests stop at Serve's proxy.

Where it fits: Ray Serve's HTTP proxy (uvicorn) hands every request to the replica as soon as its
headers arrive, and the replica then pulls the body from the proxy. A client that announces a body
and sends one byte therefore holds a replica slot (`max_ongoing_requests`) for as long as it likes:
~40 such connections starved /healthz and honest requests (issue 14). The proxy also decodes some
header values as UTF-8 (`x-request-id`, the multiplexing and session headers) and answers 500 when
that fails. `RequestGuard` is a pure ASGI middleware that runs inside the proxy, before routing:

  * header values must be UTF-8 and at most MAX_HEADER_CHARS long -> else 400 naming the header;
  * a declared Content-Length over the limit -> 413 at once; a body that grows over it -> 413;
  * the whole body must arrive within `body_timeout_s` -> else 408, and the connection is dropped;
  * at most `max_pending` requests may be receiving their body at once -> else 503.
Only complete, bounded requests reach a replica, so stalled uploads never occupy replica slots.

How it is installed: Ray 2.60 takes proxy middlewares only from a callback named by the environment
variable RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serve.guard:proxy_middlewares, read when the
proxy starts. `unigap serve` sets it (with the limits below) before it starts a local Ray; on a
cluster set it in the Ray containers' environment (cluster/ manifests do). Limits, from the
environment of the proxy: UNIGAP_SERVE_BODY_TIMEOUT_S (default 10), UNIGAP_SERVE_MAX_BODY_BYTES
(default serve.validation.MAX_BODY_BYTES), UNIGAP_SERVE_MAX_PENDING (default 256).

What it cannot do (put a reverse proxy such as nginx or an L7 load balancer in front for these):
limit connections per client, time out clients that never finish their *headers* (uvicorn holds
such sockets until keep_alive_timeout), or strip Serve's `x-request-timeout-seconds` header, which
lets a client lengthen its own end-to-end timeout.

Example (what the proxy does with it):
    >>> from starlette.middleware import Middleware
    >>> [type(m) is Middleware for m in proxy_middlewares()]
    [True]
"""

from __future__ import annotations

import asyncio
import json
import os
import time

from serve.validation import MAX_BODY_BYTES

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "serve.guard:proxy_middlewares"
BODY_TIMEOUT_ENV, MAX_BODY_ENV, MAX_PENDING_ENV = ("UNIGAP_SERVE_BODY_TIMEOUT_S", "UNIGAP_SERVE_MAX_BODY_BYTES",
                                                   "UNIGAP_SERVE_MAX_PENDING")
MAX_HEADER_CHARS = 256


def proxy_env(body_timeout_s: float, max_body_bytes: int = MAX_BODY_BYTES, max_pending: int = 256) -> dict[str, str]:
    """The environment that installs the guard in every Serve proxy started with it."""
    return {CALLBACK_ENV: CALLBACK, BODY_TIMEOUT_ENV: str(body_timeout_s), MAX_BODY_ENV: str(max_body_bytes),
            MAX_PENDING_ENV: str(max_pending)}


def proxy_middlewares() -> list:
    """Ray Serve's proxy callback: the middlewares to wrap the proxy's ASGI app in."""
    from starlette.middleware import Middleware

    return [Middleware(RequestGuard)]


class RequestGuard:
    """Pure ASGI middleware (module docstring). Limits default to the environment's."""

    def __init__(self, app, body_timeout_s: float | None = None, max_body_bytes: int | None = None,
                 max_pending: int | None = None):
        self.app = app
        self.body_timeout_s = body_timeout_s or float(os.environ.get(BODY_TIMEOUT_ENV, 10.0))
        self.max_body_bytes = max_body_bytes or int(os.environ.get(MAX_BODY_ENV, MAX_BODY_BYTES))
        self.max_pending = max_pending or int(os.environ.get(MAX_PENDING_ENV, 256))
        self.pending = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = None
        for name, value in scope.get("headers", []):
            try:
                text = value.decode("utf-8")
            except UnicodeDecodeError:
                return await _refuse(send, 400, f"header {name.decode('latin-1')!r} is not UTF-8 text", "headers")
            if len(text) > MAX_HEADER_CHARS:
                return await _refuse(send, 400, f"header {name.decode('latin-1')!r} is longer than "
                                     f"{MAX_HEADER_CHARS} characters", "headers")
            if name == b"content-length":
                length = int(text) if text.strip().isdigit() else -1
        if length is not None and (length < 0 or length > self.max_body_bytes):
            status, why = (400, "Content-Length is not a number") if length < 0 else (
                413, f"body is {length} bytes; the limit is {self.max_body_bytes}")
            return await _refuse(send, status, why, "body")
        if self.pending >= self.max_pending:
            return await _refuse(send, 503, "too many requests are uploading; retry shortly", None)
        self.pending += 1
        try:
            body = await self._read_body(receive, send)
        finally:
            self.pending -= 1
        if body is None:
            return  # refused or the client went away

        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the client's disconnect, when it comes

        await self.app(scope, replay, send)

    async def _read_body(self, receive, send) -> bytes | None:
        chunks, size = [], 0
        deadline = time.monotonic() + self.body_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                await _refuse(send, 408, f"request body not received within {self.body_timeout_s:g} s", "body")
                return None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await _refuse(send, 413, f"body is over the limit of {self.max_body_bytes} bytes", "body")
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


async def _refuse(send, status: int, message: str, field: str | None) -> None:
    """The app's error shape ({"error", "field", "status", "id"}); the connection is closed."""
    body = json.dumps({"error": message, "field": field, "status": status, "id": ""}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
