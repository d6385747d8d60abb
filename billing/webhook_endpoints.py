"""`billing webhook-endpoint`: make Stripe hold exactly one enabled webhook endpoint for this service.

The wanted endpoint: this service's webhook URL, the API version the installed SDK pins (events
are rendered in it, and our parsing expects it), exactly the event types the worker handles
(`billing.webhooks.HANDLED`: no more, or Stripe sends what we ignore; no fewer, or the sync misses
changes), and `metadata.managed_by = "billing"`.

Stripe cannot change an endpoint's API version. When the endpoint for the URL is at another
version, a new one is created beside it: both exist (one per version) until the operator has
rotated `STRIPE_WEBHOOK_SECRET` to hold both secrets, deployed, and deleted the old endpoint.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit

import stripe
from stripe.params import WebhookEndpointCreateParams, WebhookEndpointUpdateParams

from billing.errors import ConfigurationError
from billing.stripe_gateway import StripeGateway, api_version, random_idempotency_key
from billing.webhooks import HANDLED

MANAGED_KEY = "managed_by"
MANAGED_VALUE = "billing"
DESCRIPTION = "billing service: subscription, invoice, customer and checkout sync"
PAGE = 100
LOCAL_SUFFIXES = (".localhost", ".local", ".internal", ".lan", ".home.arpa")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class WantedEndpoint:
    url: str
    api_version: str
    enabled_events: tuple[str, ...]


def wanted_endpoint(*, url: str) -> WantedEndpoint:
    return WantedEndpoint(url=url, api_version=api_version(), enabled_events=tuple(sorted(HANDLED)))


def is_live_key(key: str | None) -> bool:
    return bool(key) and str(key).startswith(("sk_live_", "rk_live_"))


def url_problem(url: str, *, live: bool) -> str | None:
    """Why Stripe (live mode) cannot be pointed at `url`, or None.

    Names only: no DNS lookup (a name that resolves to a private address is not caught).
    """
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme not in {"http", "https"} or not host:
        return f"{url!r} is not an http(s) URL"
    if not live:
        return None
    problems = []
    if parts.scheme != "https":
        problems.append("is not https:// (Stripe sends live events to https endpoints only)")
    if host == "localhost" or host.endswith(LOCAL_SUFFIXES):
        problems.append(f"points at a local name ({host}) that Stripe cannot reach")
    else:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            address = None
        if address is not None and (
            address.is_loopback or address.is_private or address.is_link_local or address.is_unspecified
        ):
            problems.append(f"points at a loopback or private address ({host}) that Stripe cannot reach")
    return f"{url} {' and '.join(problems)}" if problems else None


def managed(endpoint: Any) -> bool:
    metadata = endpoint.metadata.to_dict() if endpoint.metadata is not None else {}
    return bool(metadata.get(MANAGED_KEY) == MANAGED_VALUE)


def event_differences(endpoint: Any, wanted: WantedEndpoint) -> tuple[list[str], list[str]]:
    """(missing, extra) event types of `endpoint` against the wanted list."""
    have = set(endpoint.enabled_events or [])
    if "*" in have:
        return [], ["*"]
    return sorted(set(wanted.enabled_events) - have), sorted(have - set(wanted.enabled_events))


async def list_endpoints(gateway: StripeGateway) -> list[stripe.WebhookEndpoint]:
    page = await gateway.call(
        lambda o: gateway.v1.webhook_endpoints.list_async({"limit": PAGE}, o), what="list webhook endpoints"
    )
    return [endpoint async for endpoint in page.auto_paging_iter()]


def for_url(endpoints: list[stripe.WebhookEndpoint], url: str) -> list[stripe.WebhookEndpoint]:
    """The endpoints at `url`: the pinned version first, then enabled, then ours."""
    wanted_version = api_version()
    found = [endpoint for endpoint in endpoints if endpoint.url.rstrip("/") == url.rstrip("/")]
    return sorted(
        found,
        key=lambda e: (e.api_version != wanted_version, e.status != "enabled", not managed(e), e.created),
    )


@dataclass
class EndpointReport:
    dry_run: bool
    url: str
    changes: list[str] = field(default_factory=list)
    endpoint_id: str | None = None
    secret: str | None = field(default=None, repr=False)  # Stripe shows it on creation only
    old_endpoints: list[str] = field(default_factory=list)  # same URL, another API version
    duplicates: list[str] = field(default_factory=list)  # same URL and version, left alone
    elsewhere: list[tuple[str, str]] = field(default_factory=list)  # ours at other URLs: (id, url)


async def ensure_webhook_endpoint(
    *,
    gateway: StripeGateway,
    url: str,
    live: bool,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> EndpointReport:
    problem = url_problem(url, live=live)
    if problem is not None:
        raise ConfigurationError(
            f"refusing the webhook URL: {problem}; pass --url with the service's public https URL "
            "or set PUBLIC_BASE_URL"
        )
    say = progress or (lambda _line: None)
    wanted = wanted_endpoint(url=url)
    report = EndpointReport(dry_run=dry_run, url=url)
    say(f"checking webhook endpoints for {url}")
    endpoints = await list_endpoints(gateway)
    at_url = for_url(endpoints, url)
    here = {e.id for e in at_url}
    report.elsewhere = [(e.id, e.url) for e in endpoints if managed(e) and e.id not in here]
    current = [e for e in at_url if e.api_version == wanted.api_version]
    report.old_endpoints = [e.id for e in at_url if e.api_version != wanted.api_version]
    if not current:
        what = f"create webhook endpoint for {url} (API version {wanted.api_version}, "
        what += f"{len(wanted.enabled_events)} events)"
        report.changes.append(what)
        say(("would " if dry_run else "") + what)
        if not dry_run:
            created = await _create(gateway, wanted)
            report.endpoint_id, report.secret = created.id, created.secret
        return report
    endpoint, report.duplicates = current[0], [e.id for e in current[1:]]
    report.endpoint_id = endpoint.id
    params: WebhookEndpointUpdateParams = {}
    missing, extra = event_differences(endpoint, wanted)
    if missing or extra:
        params["enabled_events"] = cast(Any, list(wanted.enabled_events))
        names = [f"+{name}" for name in missing] + [f"-{name}" for name in extra]
        report.changes.append(f"set the events of {endpoint.id}: {', '.join(names)}")
    if endpoint.status != "enabled":
        params["disabled"] = False
        report.changes.append(f"enable {endpoint.id} (it is {endpoint.status})")
    if not managed(endpoint):
        params["metadata"] = {MANAGED_KEY: MANAGED_VALUE}
        report.changes.append(f"mark {endpoint.id} as managed by this service (metadata)")
    for change in report.changes:
        say(("would " if dry_run else "") + change)
    if params and not dry_run:
        await gateway.call(
            lambda o: gateway.v1.webhook_endpoints.update_async(endpoint.id, params, o),
            what="update webhook endpoint",
        )
    return report


async def _create(gateway: StripeGateway, wanted: WantedEndpoint) -> stripe.WebhookEndpoint:
    params: WebhookEndpointCreateParams = {
        "url": wanted.url,
        "api_version": cast(Any, wanted.api_version),
        "enabled_events": cast(Any, list(wanted.enabled_events)),
        "description": DESCRIPTION,
        "metadata": {MANAGED_KEY: MANAGED_VALUE},
    }
    # A new key each run: a deleted endpoint must not come back from a replayed creation.
    return await gateway.call(
        lambda o: gateway.v1.webhook_endpoints.create_async(params, o),
        idempotency_key=random_idempotency_key("webhook_endpoint"),
        what="create webhook endpoint",
    )
