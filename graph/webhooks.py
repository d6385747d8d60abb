"""`POST /webhooks/stripe`: the REST sidecar route Stripe calls.

Verifies the signature on the raw bytes before parsing anything, stores the event once, kicks
the worker and answers. Nothing but a log line is written for a request that fails
verification. When the database cannot store the event the answer is 503, so Stripe retries.

A bare ASGI app, not a Starlette endpoint: the request and response objects around an
endpoint cost a tenth of the acknowledgement's CPU (bench/RESULTS.md, fix 16), and the route
needs only the body and two headers.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from sqlalchemy.exc import DBAPIError
from starlette.types import Receive, Scope, Send

from billing import tracing
from billing.clock import utcnow
from billing.metrics import WEBHOOKS_RECEIVED
from billing.webhooks import InvalidWebhook, parse_event, store_event, verify_signature

log = logging.getLogger("billing.webhooks")

MAX_BODY_BYTES = 1_000_000  # Stripe's events are far smaller
_NEW = WEBHOOKS_RECEIVED.labels("new")
_DUPLICATE = WEBHOOKS_RECEIVED.labels("duplicate")
_REJECTED = WEBHOOKS_RECEIVED.labels("rejected")
_TOO_LARGE = (413, {"error": "payload too large"})


class StripeWebhook:
    """The route's ASGI app (mounted by graph.app, which also calls it before FastAPI's stack)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        with tracing.span("webhook ingest"):
            answer = await _ingest(scope, receive)
        if answer is not None:
            await _send_json(send, *answer)


stripe_webhook = StripeWebhook()


async def _ingest(scope: Scope, receive: Receive) -> tuple[int, dict[str, Any]] | None:
    """The status and JSON body to answer, or None when the client has gone."""
    declared, signature = _headers(scope)
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        return _TOO_LARGE
    body = b""
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
        more = message.get("more_body", False)
        if len(body) > MAX_BODY_BYTES:
            return _TOO_LARGE
    state = scope["app"].state
    try:
        verify_signature(body, signature, state.settings.webhook_secrets)
        envelope = parse_event(body)
    except InvalidWebhook as exc:
        log.warning("rejected a webhook: %s", exc)
        _REJECTED.inc()
        return 400, {"error": "invalid webhook", "reason": str(exc)}
    try:
        new = await store_event(state.database, envelope, now=utcnow())
    except (DBAPIError, OSError) as exc:
        log.error("could not store webhook %s (%s): %s", envelope.id, envelope.type, type(exc).__name__)
        return 503, {"error": "temporarily unavailable"}
    if new:
        _NEW.inc()
        state.events.kick()
    else:
        _DUPLICATE.inc()
    return 200, {"received": True, "duplicate": not new}


def _headers(scope: Scope) -> tuple[str | None, str | None]:
    """Content-Length and Stripe-Signature (header names arrive lower-cased in ASGI)."""
    declared = signature = None
    for key, value in scope["headers"]:
        if key == b"content-length":
            declared = value.decode("latin-1")
        elif key == b"stripe-signature":
            signature = value.decode("latin-1")
    return declared, signature


async def _send_json(send: Send, status: int, content: dict[str, Any]) -> None:
    body = json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
