"""Webhook endpoints: create, retrieve, update, delete, list.

As Stripe documents them: `secret` (the signing secret, `whsec_...`) is returned by create only;
`enabled_events` must name Stripe's event types (or be `["*"]`), which the SDK's typed params
list; `disabled=true` sets `status` to `disabled`; `api_version` is chosen on create and cannot be
changed. The secret lives in the sandbox's state, not in the object, so no other answer shows it.
Delivery (`stripe_sandbox.delivery`) sends every event to each enabled endpoint that wants it,
signed with that endpoint's secret; with no endpoint registered, to the service's own route.
"""

from __future__ import annotations

import secrets
from typing import Any
from urllib.parse import urlsplit

from stripe.params import (
    WebhookEndpointCreateParams,
    WebhookEndpointDeleteParams,
    WebhookEndpointListParams,
    WebhookEndpointRetrieveParams,
    WebhookEndpointUpdateParams,
)

from stripe_sandbox.api import Call, apply_metadata, endpoint, paginate
from stripe_sandbox.errors import StripeError, parameter_invalid
from stripe_sandbox.store import Transaction, new_id

MAX_ENDPOINTS = 16  # Stripe's limit per account
SECRET_STATE_PREFIX = "whsec:"


def secret_state_key(endpoint_id: str) -> str:
    return f"{SECRET_STATE_PREFIX}{endpoint_id}"


def wants(webhook_endpoint: dict[str, Any], event_type: str) -> bool:
    """Does this endpoint receive events of `event_type`?"""
    if webhook_endpoint.get("status") != "enabled":
        return False
    enabled = webhook_endpoint.get("enabled_events") or []
    return "*" in enabled or event_type in enabled


def _check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise parameter_invalid("url", f"Invalid URL: {url}", code="url_invalid")
    return url


def _check_events(enabled_events: list[str]) -> list[str]:
    if not enabled_events:
        raise parameter_invalid("enabled_events", "You must enable at least one event.")
    if "*" in enabled_events and len(enabled_events) > 1:
        raise parameter_invalid(
            "enabled_events", "You cannot enable other events along with the `*` wildcard."
        )
    return list(dict.fromkeys(enabled_events))


@endpoint("POST", "/v1/webhook_endpoints", WebhookEndpointCreateParams)
async def create_webhook_endpoint(call: Call) -> dict[str, Any]:
    tx, params = call.tx, call.params
    if len(await tx.all("webhook_endpoint")) >= MAX_ENDPOINTS:
        raise StripeError(
            400, f"You have reached the maximum of {MAX_ENDPOINTS} test webhook endpoints.", param="url"
        )
    created: dict[str, Any] = {
        "id": new_id("we"),
        "object": "webhook_endpoint",
        "api_version": params.get("api_version"),
        "application": None,
        "created": tx.now(),
        "description": params.get("description") or None,
        "enabled_events": _check_events(params["enabled_events"]),
        "livemode": False,
        "metadata": apply_metadata({}, params.get("metadata")),
        "status": "enabled",
        "url": _check_url(params["url"]),
    }
    secret = f"whsec_{secrets.token_urlsafe(24)}"
    await tx.insert(created)
    await tx.set_state(secret_state_key(created["id"]), secret)
    return {**created, "secret": secret}


@endpoint("GET", "/v1/webhook_endpoints/{id}", WebhookEndpointRetrieveParams)
async def retrieve_webhook_endpoint(call: Call) -> dict[str, Any]:
    return await call.tx.get("webhook_endpoint", call.path["id"])


@endpoint("POST", "/v1/webhook_endpoints/{id}", WebhookEndpointUpdateParams)
async def update_webhook_endpoint(call: Call) -> dict[str, Any]:
    tx, params = call.tx, call.params
    found = await tx.get("webhook_endpoint", call.path["id"])
    if "url" in params:
        found["url"] = _check_url(params["url"])
    if "enabled_events" in params:
        found["enabled_events"] = _check_events(params["enabled_events"])
    if "description" in params:
        found["description"] = params["description"] or None
    if "disabled" in params:
        found["status"] = "disabled" if params["disabled"] else "enabled"
    if "metadata" in params:
        found["metadata"] = apply_metadata(found["metadata"], params["metadata"])
    await tx.save(found)
    return found


@endpoint("DELETE", "/v1/webhook_endpoints/{id}", WebhookEndpointDeleteParams)
async def delete_webhook_endpoint(call: Call) -> dict[str, Any]:
    tx = call.tx
    found = await tx.get("webhook_endpoint", call.path["id"])
    await tx.remove(found["id"])
    return {"id": found["id"], "object": "webhook_endpoint", "deleted": True}


@endpoint("GET", "/v1/webhook_endpoints", WebhookEndpointListParams)
async def list_webhook_endpoints(call: Call) -> dict[str, Any]:
    return paginate(await call.tx.all("webhook_endpoint"), call.params, call.url)


async def delivery_targets(tx: Transaction) -> list[tuple[dict[str, Any], str]] | None:
    """Every registered endpoint with its secret; None when none is registered."""
    registered = await tx.all("webhook_endpoint")
    if not registered:
        return None
    return [(found, await tx.get_state(secret_state_key(found["id"]), "")) for found in registered]
