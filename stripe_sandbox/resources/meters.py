"""Billing meters, meter events, meter event adjustments and meter event summaries.

Meter events are validated when they arrive (meter active, customer known, value numeric,
timestamp within Stripe's documented window of the past 35 days up to 5 minutes ahead) and
stored; summaries and `metered_quantity` (for invoices) aggregate them with the meter's formula.
"""

from __future__ import annotations

import hashlib
import math
import uuid
from typing import Any

from stripe.params.billing import (
    MeterCreateParams,
    MeterDeactivateParams,
    MeterEventAdjustmentCreateParams,
    MeterEventCreateParams,
    MeterEventSummaryListParams,
    MeterListParams,
    MeterReactivateParams,
    MeterRetrieveParams,
    MeterUpdateParams,
)

from stripe_sandbox.api import Call, endpoint, paginate
from stripe_sandbox.errors import StripeError, parameter_invalid, parameter_missing
from stripe_sandbox.resources.products import referenced
from stripe_sandbox.store import Transaction, new_id

FORMULAS = ("count", "last", "sum")
DAY = 86400
HOUR = 3600
MAX_EVENT_AGE_SECONDS = 35 * DAY  # "within the past 35 calendar days"
MAX_EVENT_FUTURE_SECONDS = 5 * 60  # "or up to 5 minutes in the future"
IDENTIFIER_UNIQUE_SECONDS = DAY  # "uniqueness within a rolling period of at least 24 hours"
ADJUSTMENT_WINDOW_SECONDS = DAY  # events can be cancelled within 24 hours of being received
_EVENT = "billing.meter_event"


def public_event(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored meter event as the API shows it (without the sandbox's own bookkeeping)."""
    return {
        "object": _EVENT,
        "created": stored["created"],
        "event_name": stored["event_name"],
        "identifier": stored["identifier"],
        "livemode": False,
        "payload": stored["payload"],
        "timestamp": stored["timestamp"],
    }


# Meters -----------------------------------------------------------------------------------------


async def _active_meter_named(tx: Transaction, event_name: str) -> dict[str, Any] | None:
    found = await tx.all(
        "billing.meter", lambda meter: meter["event_name"] == event_name and meter["status"] == "active"
    )
    return found[0] if found else None


@endpoint("POST", "/v1/billing/meters", MeterCreateParams)
async def create_meter(call: Call) -> dict[str, Any]:
    tx, params = call.tx, call.params
    formula = params["default_aggregation"]["formula"]
    if formula not in FORMULAS:
        raise parameter_invalid(
            "default_aggregation[formula]", "Invalid formula: must be one of count, last or sum"
        )
    event_name = params["event_name"]
    if not event_name or len(event_name) > 100:
        raise parameter_invalid("event_name", "event_name must be between 1 and 100 characters.")
    if not params["display_name"] or len(params["display_name"]) > 250:
        raise parameter_invalid("display_name", "display_name must be between 1 and 250 characters.")
    if params.get("event_time_window") not in (None, "day", "hour"):
        raise parameter_invalid("event_time_window", "Invalid event_time_window: must be one of day or hour")
    if await _active_meter_named(tx, event_name) is not None:
        raise parameter_invalid(
            "event_name", f"An active meter with the event_name `{event_name}` already exists."
        )
    mapping = params.get("customer_mapping") or {}
    now = tx.now()
    meter = {
        "id": new_id("mtr"),
        "object": "billing.meter",
        "created": now,
        "customer_mapping": {
            "event_payload_key": mapping.get("event_payload_key", "stripe_customer_id"),
            "type": mapping.get("type", "by_id"),
        },
        "default_aggregation": {"formula": formula},
        "display_name": params["display_name"],
        "event_name": event_name,
        "event_time_window": params.get("event_time_window"),
        "livemode": False,
        "status": "active",
        "status_transitions": {"deactivated_at": None},
        "updated": now,
        "value_settings": {
            "event_payload_key": (params.get("value_settings") or {}).get("event_payload_key", "value")
        },
    }
    await tx.insert(meter)
    await tx.emit("billing.meter.created", meter)
    return meter


@endpoint("GET", "/v1/billing/meters/{id}", MeterRetrieveParams)
async def retrieve_meter(call: Call) -> dict[str, Any]:
    return await call.tx.get("billing.meter", call.path["id"])


@endpoint("POST", "/v1/billing/meters/{id}", MeterUpdateParams)
async def update_meter(call: Call) -> dict[str, Any]:
    tx = call.tx
    meter = await tx.get("billing.meter", call.path["id"])
    name = call.params.get("display_name")
    if name is not None and name != meter["display_name"]:
        if len(name) > 250 or not name:
            raise parameter_invalid("display_name", "display_name must be between 1 and 250 characters.")
        previous = meter["display_name"]
        meter["display_name"] = name
        meter["updated"] = tx.now()
        await tx.save(meter)
        await tx.emit("billing.meter.updated", meter, previous_attributes={"display_name": previous})
    return meter


@endpoint("GET", "/v1/billing/meters", MeterListParams)
async def list_meters(call: Call) -> dict[str, Any]:
    status = call.params.get("status")
    if status not in (None, "active", "inactive"):
        raise parameter_invalid("status", "Invalid status: must be one of active or inactive")
    meters = await call.tx.all("billing.meter", lambda m: status is None or m["status"] == status)
    return paginate(meters, call.params, call.url)


@endpoint("POST", "/v1/billing/meters/{id}/deactivate", MeterDeactivateParams)
async def deactivate_meter(call: Call) -> dict[str, Any]:
    tx = call.tx
    meter = await tx.get("billing.meter", call.path["id"])
    if meter["status"] == "active":
        now = tx.now()
        meter.update(status="inactive", status_transitions={"deactivated_at": now}, updated=now)
        await tx.save(meter)
        await tx.emit(
            "billing.meter.deactivated",
            meter,
            previous_attributes={"status": "active", "status_transitions": {"deactivated_at": None}},
        )
    return meter


@endpoint("POST", "/v1/billing/meters/{id}/reactivate", MeterReactivateParams)
async def reactivate_meter(call: Call) -> dict[str, Any]:
    tx = call.tx
    meter = await tx.get("billing.meter", call.path["id"])
    if meter["status"] == "inactive":
        if await _active_meter_named(tx, meter["event_name"]) is not None:
            raise StripeError(
                400,
                f"An active meter with the event_name `{meter['event_name']}` already exists.",
            )
        previous = dict(meter["status_transitions"])
        meter.update(status="active", status_transitions={"deactivated_at": None}, updated=tx.now())
        await tx.save(meter)
        await tx.emit(
            "billing.meter.reactivated",
            meter,
            previous_attributes={"status": "inactive", "status_transitions": previous},
        )
    return meter


# Meter events -----------------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


@endpoint("POST", "/v1/billing/meter_events", MeterEventCreateParams)
async def create_meter_event(call: Call) -> dict[str, Any]:
    """Record usage.

    Stripe validates some of this only asynchronously (reporting `billing.meter.error_report_triggered`);
    the sandbox refuses a bad event at once, with the error code Stripe's error report uses, so a
    mistake shows up where it is made.

    A repeated `identifier` within 24 hours is refused with a 400 `resource_already_exists` on
    `identifier` and nothing is recorded: Stripe documents that it enforces the identifier's
    uniqueness to stop duplicates from retries, and this lets a caller that retries with the same
    identifier treat that error as "already recorded".
    """
    tx, params = call.tx, call.params
    now = tx.now()
    event_name = params["event_name"]
    meter = await _active_meter_named(tx, event_name)
    if meter is None:
        inactive = await tx.all("billing.meter", lambda m: m["event_name"] == event_name)
        if inactive:
            raise parameter_invalid(
                "event_name", f"The meter for event_name `{event_name}` is inactive.", "archived_meter"
            )
        raise parameter_invalid(
            "event_name", f"No active meter has the event_name `{event_name}`.", "no_meter"
        )
    timestamp = int(params.get("timestamp", now))
    if timestamp < now - MAX_EVENT_AGE_SECONDS:
        raise parameter_invalid(
            "timestamp",
            "The timestamp must be within the past 35 calendar days.",
            "timestamp_too_far_in_past",
        )
    if timestamp > now + MAX_EVENT_FUTURE_SECONDS:
        raise parameter_invalid(
            "timestamp", "The timestamp must be at most 5 minutes in the future.", "timestamp_in_future"
        )
    payload: dict[str, str] = params["payload"]
    customer_key = meter["customer_mapping"]["event_payload_key"]
    customer_id = payload.get(customer_key)
    if not customer_id:
        raise parameter_invalid(
            f"payload[{customer_key}]",
            f"The payload must contain `{customer_key}`, the customer of the event.",
            "meter_event_no_customer_defined",
        )
    found = await tx.find(customer_id)
    if found is None or found.get("object") != "customer" or found.get("deleted"):
        raise parameter_invalid(
            f"payload[{customer_key}]", f"No such customer: '{customer_id}'", "meter_event_customer_not_found"
        )
    value: float | None = None
    if meter["default_aggregation"]["formula"] != "count":
        value_key = meter["value_settings"]["event_payload_key"]
        if value_key not in payload:
            raise parameter_invalid(
                f"payload[{value_key}]",
                f"The payload must contain `{value_key}`, the value of the event.",
                "meter_event_value_not_found",
            )
        value = _number(payload[value_key])
        if value is None:
            raise parameter_invalid(
                f"payload[{value_key}]",
                f"The value `{payload[value_key]}` is not a number.",
                "meter_event_invalid_value",
            )
    identifier = params.get("identifier") or str(uuid.uuid4())
    if len(identifier) > 100:
        raise parameter_invalid("identifier", "identifier must be at most 100 characters.")
    recent = await tx.all(
        _EVENT,
        lambda event: (
            event["identifier"] == identifier and event["created"] > now - IDENTIFIER_UNIQUE_SECONDS
        ),
    )
    if recent:
        raise StripeError(
            400,
            f"A meter event with the identifier `{identifier}` already exists.",
            code="resource_already_exists",
            param="identifier",
        )
    stored = {
        "id": new_id("mtrevt"),  # the sandbox's own key: meter events have no id in Stripe
        "object": _EVENT,
        "created": now,
        "event_name": event_name,
        "identifier": identifier,
        "livemode": False,
        "payload": dict(payload),
        "timestamp": timestamp,
        "meter": meter["id"],
        "customer": customer_id,
        "value": value,
        "cancelled": False,
    }
    await tx.insert(stored)
    return public_event(stored)


@endpoint("POST", "/v1/billing/meter_event_adjustments", MeterEventAdjustmentCreateParams)
async def create_meter_event_adjustment(call: Call) -> dict[str, Any]:
    """Cancel a meter event by its identifier (within 24 hours of its arrival, as Stripe allows)."""
    tx, params = call.tx, call.params
    if params["type"] != "cancel":
        raise parameter_invalid("type", "Invalid type: must be cancel")
    identifier = (params.get("cancel") or {}).get("identifier")
    if not identifier:
        raise parameter_missing("cancel[identifier]")
    now = tx.now()
    events = await tx.all(
        _EVENT,
        lambda event: event["identifier"] == identifier and event["event_name"] == params["event_name"],
    )
    if not events:
        raise parameter_invalid(
            "cancel[identifier]", f"No meter event with the identifier `{identifier}` was found."
        )
    event = events[0]
    if event["created"] <= now - ADJUSTMENT_WINDOW_SECONDS:
        raise parameter_invalid(
            "cancel[identifier]", "Meter events can only be cancelled within 24 hours of being received."
        )
    event["cancelled"] = True
    await tx.save(event)
    return {
        "object": "billing.meter_event_adjustment",
        "cancel": {"identifier": identifier},
        "event_name": params["event_name"],
        "livemode": False,
        "status": "complete",
        "type": "cancel",
    }


# Aggregation ------------------------------------------------------------------------------------


def aggregate(formula: str, events: list[dict[str, Any]]) -> float:
    """The meter's formula over its events: their count, the sum of their values, or the last one."""
    if formula == "count":
        return float(len(events))
    if formula == "last":
        if not events:
            return 0.0
        last = max(events, key=lambda event: (event["timestamp"], event["created"]))
        return float(last["value"] or 0)
    return float(sum(event["value"] or 0 for event in events))


async def _events(
    tx: Transaction, meter_id: str, customer_id: str, start: int, end: int
) -> list[dict[str, Any]]:
    return await tx.all(
        _EVENT,
        lambda event: (
            event["meter"] == meter_id
            and event["customer"] == customer_id
            and not event["cancelled"]
            and start <= event["timestamp"] < end
        ),
    )


async def metered_quantity(tx: Transaction, meter_id: str, customer_id: str, start: int, end: int) -> float:
    """The usage a meter has recorded for a customer in [start, end), for billing."""
    meter = await tx.get("billing.meter", meter_id)
    events = await _events(tx, meter_id, customer_id, start, end)
    return aggregate(meter["default_aggregation"]["formula"], events)


def _summary_value(value: float) -> float | int:
    return int(value) if value == int(value) else value


def _summary(meter_id: str, customer_id: str, start: int, end: int, value: float) -> dict[str, Any]:
    digest = hashlib.sha256(f"{meter_id}:{customer_id}:{start}:{end}".encode()).hexdigest()[:24]
    return {
        "id": f"mtrusg_{digest}",
        "object": "billing.meter_event_summary",
        "aggregated_value": _summary_value(value),
        "end_time": end,
        "livemode": False,
        "meter": meter_id,
        "start_time": start,
    }


@endpoint("GET", "/v1/billing/meters/{id}/event_summaries", MeterEventSummaryListParams)
async def list_event_summaries(call: Call) -> dict[str, Any]:
    """Aggregated usage of one customer, over [start_time, end_time) or per hour or day of it.

    Without `value_grouping_window` there is one summary for the whole range (zero if no usage);
    with one, a summary per window that has events, newest first like every Stripe list.
    """
    tx, params = call.tx, call.params
    meter = await tx.get("billing.meter", call.path["id"])
    customer = await referenced(tx, "customer", params["customer"], "customer")
    start, end = int(params["start_time"]), int(params["end_time"])
    window = params.get("value_grouping_window")
    if window not in (None, "day", "hour"):
        raise parameter_invalid("value_grouping_window", "Invalid value_grouping_window: must be day or hour")
    step = {None: 60, "hour": HOUR, "day": DAY}[window]
    unit = {None: "minute", "hour": "hour", "day": "day"}[window]
    for name, moment in (("start_time", start), ("end_time", end)):
        if moment % step:
            raise parameter_invalid(name, f"{name} must be aligned with {unit} boundaries (UTC).")
    if start >= end:
        raise parameter_invalid("start_time", "start_time must be before end_time.")
    formula = meter["default_aggregation"]["formula"]
    events = await _events(tx, meter["id"], customer["id"], start, end)
    summaries: list[dict[str, Any]] = []
    if window is None:
        summaries.append(_summary(meter["id"], customer["id"], start, end, aggregate(formula, events)))
    else:
        by_window: dict[int, list[dict[str, Any]]] = {}
        for event in events:
            by_window.setdefault(start + (event["timestamp"] - start) // step * step, []).append(event)
        for window_start in sorted(by_window, reverse=True):
            value = aggregate(formula, by_window[window_start])
            summaries.append(_summary(meter["id"], customer["id"], window_start, window_start + step, value))
    return paginate(summaries, params, call.url)
