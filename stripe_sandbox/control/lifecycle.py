"""Control routes that play the customer and the passage of time (not part of Stripe's API).

- `POST /_control/checkout/{session_id}/complete` `{"outcome": "paid"|"declined", "email"?, "name"?}`:
  the customer submits Checkout. Paid: subscription (trialing or active), first invoice paid,
  session complete, with Stripe's events. Declined: the session stays open, no events.
- `POST /_control/customers/{customer_id}/payment_method` `{"fails": true|false}`: whether
  charges to this customer fail from now on.
- `POST /_control/clock/advance` `{"seconds": N}`: moves the sandbox clock forward and does
  what Stripe would meanwhile, in time order (see `stripe_sandbox.engine` for trials,
  renewals, the dunning schedule — retries 3, 5 and 7 days after the first failed attempt —
  cancellations and schedule phases). Answers `{"now", "advanced_by", "events": [...]}`.
- `GET /_control/clock`: `{"now": <sandbox time>}`.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from stripe_sandbox.api import SandboxHost, control
from stripe_sandbox.engine import clock, creation, payments
from stripe_sandbox.errors import parameter_invalid, parameter_missing


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except json.JSONDecodeError:
        raise parameter_invalid("body", "The control routes take a JSON body.") from None
    if not isinstance(body, dict):
        raise parameter_invalid("body", "The control routes take a JSON object.")
    return body


@control("POST", "/_control/checkout/{session_id}/complete")
async def complete_checkout(sandbox: SandboxHost, request: Request) -> Response:
    body = await _body(request)
    outcome = str(body.get("outcome", "paid"))
    async with sandbox.transaction() as tx:
        result = await creation.complete_checkout(
            tx,
            sandbox.config,
            request.path_params["session_id"],
            outcome=outcome,
            email=body.get("email"),
            name=body.get("name"),
            promotion_code=body.get("promotion_code"),
        )
    return JSONResponse(result)


@control("POST", "/_control/customers/{customer_id}/payment_method")
async def set_payment_method(sandbox: SandboxHost, request: Request) -> Response:
    body = await _body(request)
    if "fails" not in body:
        raise parameter_missing("fails")
    if not isinstance(body["fails"], bool):
        raise parameter_invalid("fails", "fails must be true or false")
    customer_id = request.path_params["customer_id"]
    async with sandbox.transaction() as tx:
        await payments.set_payment_method_fails(tx, customer_id, body["fails"])
    return JSONResponse({"customer": customer_id, "fails": body["fails"]})


@control("POST", "/_control/clock/advance")
async def advance_clock(sandbox: SandboxHost, request: Request) -> Response:
    body = await _body(request)
    if "seconds" not in body:
        raise parameter_missing("seconds")
    try:
        seconds = int(body["seconds"])
    except (TypeError, ValueError):
        raise parameter_invalid("seconds", "seconds must be an integer") from None
    async with sandbox.transaction() as tx:
        summary = await clock.advance_clock(tx, sandbox.config, seconds)
    return JSONResponse(summary)


@control("GET", "/_control/clock")
async def read_clock(sandbox: SandboxHost, request: Request) -> Response:
    async with sandbox.transaction() as tx:
        now = tx.now()
    return JSONResponse({"now": now})
