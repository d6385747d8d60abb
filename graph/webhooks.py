"""`POST /webhooks/stripe`: the REST sidecar route Stripe calls.

Verifies the signature on the raw bytes before parsing anything, stores the event once, kicks
the worker and answers. Nothing but a log line is written for a request that fails
verification. When the database cannot store the event the answer is 503, so Stripe retries.
"""

from __future__ import annotations

import logging

from sqlalchemy.exc import DBAPIError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from billing import tracing
from billing.clock import utcnow
from billing.metrics import WEBHOOKS_RECEIVED
from billing.webhooks import InvalidWebhook, parse_event, store_event, verify_signature

log = logging.getLogger("billing.webhooks")

MAX_BODY_BYTES = 1_000_000  # Stripe's events are far smaller


async def stripe_webhook(request: Request) -> Response:
    with tracing.span("webhook ingest"):
        return await _ingest(request)


async def _ingest(request: Request) -> Response:
    state = request.app.state
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        return JSONResponse({"error": "payload too large"}, status_code=413)
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        return JSONResponse({"error": "payload too large"}, status_code=413)
    try:
        verify_signature(body, request.headers.get("stripe-signature"), state.settings.webhook_secrets)
        envelope = parse_event(body)
    except InvalidWebhook as exc:
        log.warning("rejected a webhook: %s", exc)
        WEBHOOKS_RECEIVED.labels("rejected").inc()
        return JSONResponse({"error": "invalid webhook", "reason": str(exc)}, status_code=400)
    try:
        new = await store_event(state.database, envelope, now=utcnow())
    except (DBAPIError, OSError) as exc:
        log.error("could not store webhook %s (%s): %s", envelope.id, envelope.type, type(exc).__name__)
        return JSONResponse({"error": "temporarily unavailable"}, status_code=503)
    WEBHOOKS_RECEIVED.labels("new" if new else "duplicate").inc()
    if new:
        state.events.kick()
    return JSONResponse({"received": True, "duplicate": not new})
