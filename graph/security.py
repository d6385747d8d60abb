"""HTTP safety in front of /graphql: body size, content type, no batches, and CORS.

`protect_graphql(app, settings)` wraps the GraphQL ASGI app:

- a body over `MAX_REQUEST_BYTES` (declared, or counted while it streams in): 413,
  REQUEST_TOO_LARGE;
- a POST whose `Content-Type` is not `application/json` (forms, `text/plain`, multipart): 415,
  UNSUPPORTED_MEDIA_TYPE;
- a POST whose JSON body is an array (a batch of operations): 400, BATCH_NOT_SUPPORTED.

Those answers are GraphQL-shaped JSON (`{"errors": [{"message", "extensions": {"code"}}]}`).
Requiring `application/json` means a cross-site HTML form cannot post an operation (no CSRF
through simple requests: any other content type needs a CORS preflight); mutations are refused
over GET by Strawberry (400). Browsers may call /graphql from the origins of
`CORS_ALLOW_ORIGINS` only (Starlette's `CORSMiddleware`, outermost, so refusals carry CORS
headers too); websockets check the same list on their handshake (graph.view). Websockets pass
through untouched.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from billing.settings import Settings

REQUEST_TOO_LARGE = "REQUEST_TOO_LARGE"
UNSUPPORTED_MEDIA_TYPE = "UNSUPPORTED_MEDIA_TYPE"
BATCH_NOT_SUPPORTED = "BATCH_NOT_SUPPORTED"
JSON_MEDIA_TYPE = "application/json"
CORS_HEADERS = ("authorization", "content-type", "x-request-id")
EXPOSED_HEADERS = ("x-request-id", "retry-after")
CORS_MAX_AGE = 600


class RequestGuard:
    """The body-size, content-type and batch checks (see the module docstring)."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        declared = headers.get("content-length", "")
        if declared.strip().isdigit() and int(declared) > self.max_body_bytes:
            await self._refuse(send, 413, REQUEST_TOO_LARGE, self._too_large())
            return
        method = scope["method"]
        if method == "POST":
            media_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if media_type != JSON_MEDIA_TYPE:
                await self._refuse(
                    send, 415, UNSUPPORTED_MEDIA_TYPE, f"send operations as {JSON_MEDIA_TYPE} (POST)"
                )
                return
            scope = _with_json_content_type(
                scope
            )  # media types are case-insensitive; Strawberry's check is not
        if method not in {"POST", "PUT", "PATCH"} and "content-length" not in headers:
            await self.app(scope, receive, send)  # nothing to read: GET, OPTIONS
            return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = bool(message.get("more_body", False))
            if len(body) > self.max_body_bytes:
                await self._refuse(send, 413, REQUEST_TOO_LARGE, self._too_large())
                return
        if method == "POST" and bytes(body).lstrip()[:1] == b"[":
            await self._refuse(
                send, 400, BATCH_NOT_SUPPORTED, "batched requests are not supported: send one operation"
            )
            return
        await self.app(scope, _replay(bytes(body), receive), send)

    def _too_large(self) -> str:
        return f"the request body is larger than {self.max_body_bytes} bytes"

    @staticmethod
    async def _refuse(send: Send, status: int, code: str, message: str) -> None:
        payload = json.dumps({"errors": [{"message": message, "extensions": {"code": code}}]}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


def _with_json_content_type(scope: Scope) -> Scope:
    headers = [
        (key, JSON_MEDIA_TYPE.encode() if key.lower() == b"content-type" else value)
        for key, value in scope["headers"]
    ]
    return {**scope, "headers": headers}


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # the disconnect, when the app waits for it

    return replay


def cors(app: ASGIApp, origins: Sequence[str]) -> ASGIApp:
    """`app` behind Starlette's CORS middleware for `origins` (unchanged when there are none)."""
    if not origins:
        return app
    return CORSMiddleware(
        app,
        allow_origins=list(origins),
        allow_methods=["GET", "POST"],
        allow_headers=list(CORS_HEADERS),
        expose_headers=list(EXPOSED_HEADERS),
        max_age=CORS_MAX_AGE,
    )


def protect_graphql(app: ASGIApp, settings: Settings) -> ASGIApp:
    """The GraphQL ASGI app with the request checks and CORS of `settings`."""
    return cors(RequestGuard(app, max_body_bytes=settings.max_request_bytes), settings.cors_origins)
