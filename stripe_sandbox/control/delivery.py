"""Control routes for webhook delivery: the mode, the outbox counts, and a flush for tests.

POST /_control/delivery        {"mode": "ordered" | "shuffled_duplicated"}
GET  /_control/delivery        the mode and counts (pending, delivered, failed, ...)
POST /_control/delivery/flush  {"timeout": 10}: deliver until nothing is pending
POST /_control/events/{id}/resend  send one event again now (the Dashboard's "Resend"):
                                  {"event", "attempts": [{"url", "status", "response"}...]}
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from stripe_sandbox.api import SandboxHost, control
from stripe_sandbox.delivery import MODE_STATE_KEY, MODES, Attempt, Deliverer, UnknownEvent
from stripe_sandbox.errors import resource_missing

MAX_FLUSH_SECONDS = 120.0


def _deliverer(sandbox: SandboxHost) -> Deliverer | None:
    found = getattr(sandbox, "delivery", None)
    return found if isinstance(found, Deliverer) else None


def _unavailable() -> Response:
    return JSONResponse({"error": "this sandbox has no webhook delivery"}, status_code=503)


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = await request.json()
    except ValueError:
        return {"__invalid__": True}
    return body if isinstance(body, dict) else {"__invalid__": True}


@control("POST", "/_control/delivery")
async def set_delivery_mode(sandbox: SandboxHost, request: Request) -> Response:
    body = await _json_body(request)
    mode = body.get("mode")
    if mode not in MODES:
        return JSONResponse({"error": f"mode must be one of {list(MODES)}"}, status_code=400)
    async with sandbox.transaction() as tx:
        await tx.set_state(MODE_STATE_KEY, str(mode))
    deliverer = _deliverer(sandbox)
    if deliverer is None:
        return JSONResponse({"mode": mode})
    return JSONResponse((await deliverer.stats()).as_dict())


@control("GET", "/_control/delivery")
async def delivery_status(sandbox: SandboxHost, request: Request) -> Response:
    deliverer = _deliverer(sandbox)
    if deliverer is None:
        return _unavailable()
    return JSONResponse((await deliverer.stats()).as_dict())


@control("POST", "/_control/delivery/flush")
async def flush_delivery(sandbox: SandboxHost, request: Request) -> Response:
    deliverer = _deliverer(sandbox)
    if deliverer is None:
        return _unavailable()
    body = await _json_body(request)
    try:
        timeout = min(float(body.get("timeout", 10.0)), MAX_FLUSH_SECONDS)
    except (TypeError, ValueError):
        return JSONResponse({"error": "timeout must be a number of seconds"}, status_code=400)
    try:
        stats = await deliverer.drain(timeout=timeout)
    except TimeoutError:
        return JSONResponse(
            {"error": "outbox not drained", **(await deliverer.stats()).as_dict()}, status_code=504
        )
    return JSONResponse(stats.as_dict())


async def resend(sandbox: SandboxHost, event_id: str) -> list[Attempt]:
    """What the resend route and the dashboard's "Resend" button do."""
    deliverer = _deliverer(sandbox)
    if deliverer is None:
        raise LookupError("this sandbox has no webhook delivery")
    try:
        return await deliverer.resend(event_id)
    except UnknownEvent:
        raise resource_missing("event", event_id) from None


@control("POST", "/_control/events/{event_id}/resend")
async def resend_event(sandbox: SandboxHost, request: Request) -> Response:
    """Send one event again now to the endpoints that want it; what each answered."""
    event_id = request.path_params["event_id"]
    try:
        attempts = await resend(sandbox, event_id)
    except LookupError:
        return _unavailable()
    return JSONResponse({"event": event_id, "attempts": [a.as_dict() for a in attempts]})
