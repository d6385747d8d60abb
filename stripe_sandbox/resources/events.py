"""Events: retrieve and list what `Transaction.emit` recorded, over Stripe's 30-day retention.

`pending_webhooks` reads the delivery state of the sandbox's outbox: 0 once delivered.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from stripe.params import EventListParams, EventRetrieveParams

from stripe_sandbox.api import Call, created_filter, endpoint, paginate
from stripe_sandbox.errors import parameter_invalid, resource_missing
from stripe_sandbox.store import Transaction, events

RETENTION_SECONDS = 30 * 86400
MAX_TYPES = 20


async def _delivered_ids(tx: Transaction) -> set[str]:
    rows = await tx.conn.execute(select(events.c.id).where(events.c.delivered.is_(True)))
    return {str(row[0]) for row in rows}


def _with_delivery(event: dict[str, Any], delivered: set[str]) -> dict[str, Any]:
    if event["id"] in delivered:
        return {**event, "pending_webhooks": 0}
    return event


@endpoint("GET", "/v1/events/{id}", EventRetrieveParams)
async def retrieve_event(call: Call) -> dict[str, Any]:
    tx = call.tx
    event = await tx.get("event", call.path["id"])
    if event["created"] < tx.now() - RETENTION_SECONDS:
        raise resource_missing("event", event["id"])
    return _with_delivery(event, await _delivered_ids(tx))


def _type_matcher(pattern: str) -> Callable[[str], bool]:
    """Stripe's `type` filter: an event type, or a group of them with `*` as a wildcard."""
    regex = re.compile("^" + ".*".join(re.escape(part) for part in pattern.split("*")) + "$")
    return lambda event_type: regex.match(event_type) is not None


@endpoint("GET", "/v1/events", EventListParams)
async def list_events(call: Call) -> dict[str, Any]:
    tx, params = call.tx, call.params
    if "type" in params and "types" in params:
        raise parameter_invalid("types", "You may pass either `type` or `types`, but not both.")
    types = params.get("types")
    if types is not None and len(types) > MAX_TYPES:
        raise parameter_invalid("types", f"You may pass at most {MAX_TYPES} types.")
    type_matches = _type_matcher(params["type"]) if "type" in params else None
    in_range = created_filter(params)
    oldest = tx.now() - RETENTION_SECONDS
    delivered = await _delivered_ids(tx)
    success = params.get("delivery_success")

    def wanted(event: dict[str, Any]) -> bool:
        return (
            event["created"] >= oldest
            and in_range(event)
            and (type_matches is None or type_matches(event["type"]))
            and (types is None or event["type"] in types)
            and (success is None or (event["id"] in delivered) == success)
        )

    found = [_with_delivery(event, delivered) for event in await tx.all("event", wanted)]
    return paginate(found, params, call.url)
