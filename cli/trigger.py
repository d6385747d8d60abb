"""`billing trigger EVENT_TYPE`: the offline `stripe trigger`, against a running service's sandbox.

It plays Stripe, the customer and the passage of time over HTTP, as anyone outside the service
would: the official SDK (through `StripeGateway`) for the merchant's API calls, and the sandbox's
control routes (`/sandbox/_control/...`) for what a customer or the clock does. So the real
sequence of events for the type happens in the sandbox, and the sandbox delivers it to the
service's webhook route like any other event. Development only: with `STRIPE_SECRET_KEY` set
there is no sandbox, and Stripe's own `stripe trigger` is the tool.

Each scenario works on the objects of one user (`--user`, default a new `trigger_<random>`): their
customer (found by `metadata.userId`, created when missing) and their live subscription
(created through a paid checkout of the starter monthly price when one is needed).
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import httpx
from stripe import RequestOptions

from billing.catalog import sync_catalog
from billing.errors import BillingError, ConfigurationError, ErrorCode
from billing.plans import load_catalog
from billing.settings import Settings
from billing.stripe_gateway import GatewayConfig, StripeGateway
from db.enums import BillingInterval, Tier
from stripe_sandbox.engine import DAY, FINALIZE_DELAY, LIVE_STATUSES, TRIAL_WILL_END_NOTICE

T = TypeVar("T")
Echo = Callable[[str], None]

DELIVERY_TIMEOUT_SECONDS = 20.0


class TriggerError(Exception):
    """The scenario cannot run as asked (the message says why); exit status 1."""


def ensure_sandbox(settings: Settings) -> None:
    if not settings.sandbox_mode:
        raise ConfigurationError(
            "billing trigger drives the local Stripe sandbox, and STRIPE_SECRET_KEY is set (no sandbox): "
            "use Stripe's own `stripe trigger EVENT_TYPE` instead"
        )


def new_user_id() -> str:
    return f"trigger_{secrets.token_hex(4)}"


def get(obj: Any, key: str) -> Any:
    """A field of an SDK object or a dict."""
    try:
        return obj[key]
    except (KeyError, TypeError):
        return None


def customer_of(obj: Any) -> str | None:
    """The customer an event's object is about (None for catalog objects and the like)."""
    if get(obj, "object") == "customer":
        return str(get(obj, "id"))
    customer = get(obj, "customer")
    if customer is not None and not isinstance(customer, str):
        customer = get(customer, "id")
    return None if customer is None else str(customer)


def period_end(subscription: Any) -> int:
    return int(subscription["items"]["data"][0]["current_period_end"])


@dataclass
class Trigger:
    """One run: the user it acts for, and the events the sandbox emitted about their customer."""

    settings: Settings
    gateway: StripeGateway
    http: httpx.AsyncClient
    user_id: str
    echo: Echo
    customer_id: str | None = None
    events: list[tuple[str, str]] = field(default_factory=list)  # (type, id), oldest first
    _seen: set[str] = field(default_factory=set)

    @property
    def sandbox_url(self) -> str:
        return str(self.gateway.config.api_base)

    # Plumbing ---------------------------------------------------------------------------------

    async def sdk(self, what: str, operation: Callable[[RequestOptions], Awaitable[T]]) -> T:
        return await self.gateway.call(operation, what=what)

    async def control(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        url = f"{self.sandbox_url}/_control/{path}"
        try:
            response = await self.http.request(method, url, json=body)
        except httpx.TransportError as exc:
            raise BillingError(
                f"cannot reach the sandbox at {self.sandbox_url} ({type(exc).__name__})",
                code=ErrorCode.BILLING_PROVIDER_UNAVAILABLE,
            ) from None
        try:
            answer = response.json()
        except ValueError:
            answer = {}
        if response.status_code != 200:
            error = answer.get("error") if isinstance(answer, dict) else None
            message = error.get("message") if isinstance(error, dict) else error
            raise TriggerError(
                f"the sandbox refused {method} /_control/{path} ({response.status_code}): "
                f"{message or response.text[:200]}"
            )
        return answer if isinstance(answer, dict) else {}

    async def clock(self) -> int:
        return int((await self.control("GET", "clock"))["now"])

    async def new_events(
        self, since: int, also: list[dict[str, Any]] | None = None
    ) -> list[tuple[str, str, str | None]]:
        """Events created at or after `since` (sandbox time) not seen yet: (type, id, customer).

        `also`: the events a clock advance reported. Those older than Stripe's 30-day event
        retention are no longer listed, so their customer is unknown.
        """
        page = await self.sdk(
            "list events",
            lambda o: self.gateway.v1.events.list_async({"created": {"gte": since}, "limit": 100}, o),
        )
        found = [
            (str(event.type), str(event.id), customer_of(event.data.object))
            async for event in page.auto_paging_iter()
        ]
        found.reverse()  # oldest first
        found += [(str(event["type"]), str(event["id"]), None) for event in also or []]
        fresh = []
        for event_type, event_id, customer in found:
            if event_id not in self._seen:
                self._seen.add(event_id)
                fresh.append((event_type, event_id, customer))
        return fresh

    async def step(self, description: str, action: Callable[[], Awaitable[T]]) -> T:
        """Do one thing, then print the events it caused about the user's customer.

        The sandbox clock is shared: what it makes happen to other customers is only counted.
        """
        self.echo(f"- {description}")
        since = await self.clock()
        result = await action()
        reported = result.get("events") if isinstance(result, dict) else None
        others = 0
        for event_type, event_id, customer in await self.new_events(
            since, reported if isinstance(reported, list) else None
        ):
            if customer is None or customer != self.customer_id:
                others += 1
                continue
            self.echo(f"    {event_type:<45} {event_id}")
            self.events.append((event_type, event_id))
        if others:
            self.echo(f"    (and {others} event(s) about other customers or the catalog)")
        return result

    # Building blocks -------------------------------------------------------------------------

    async def customer(self) -> str:
        """The user's customer (found by `metadata.userId`), created when there is none."""
        if self.customer_id is not None:
            return self.customer_id
        query = f"metadata['userId']:'{self.user_id}'"
        found = await self.sdk(
            "search customers", lambda o: self.gateway.v1.customers.search_async({"query": query}, o)
        )
        if found.data:
            self.customer_id = str(found.data[0].id)
            self.echo(f"- using customer {self.customer_id} of user {self.user_id}")
            return self.customer_id

        async def create() -> str:
            created = await self.sdk(
                "create customer",
                lambda o: self.gateway.v1.customers.create_async(
                    {
                        "email": f"{self.user_id}@example.com",
                        "name": f"Trigger {self.user_id}",
                        "metadata": {"userId": self.user_id},
                    },
                    o,
                ),
            )
            self.customer_id = str(created.id)
            return self.customer_id

        customer_id = await self.step(f"create a customer with metadata.userId={self.user_id}", create)
        self.echo(f"    -> {customer_id}")
        return customer_id

    async def starter_price(self) -> str:
        catalog = load_catalog(self.settings.billing_plans_file)
        try:
            lookup_key = catalog.price(Tier.STARTER, BillingInterval.MONTHLY).lookup_key
        except KeyError:
            raise TriggerError("the plans file has no starter monthly price to check out") from None
        for attempt in range(2):
            page = await self.sdk(
                "list prices",
                lambda o: self.gateway.v1.prices.list_async(
                    {"lookup_keys": [lookup_key], "active": True, "limit": 1}, o
                ),
            )
            if page.data:
                return str(page.data[0].id)
            if attempt == 0:
                await self.step(
                    f"no price {lookup_key} in the sandbox yet: sync the catalog",
                    lambda: sync_catalog(
                        catalog=catalog, gateway=self.gateway, return_url=f"{self.settings.app_url}/billing"
                    ),
                )
        raise TriggerError(f"price {lookup_key} is still missing after `billing catalog sync`")

    async def checkout(self, *, trial_days: int | None = None) -> Any:
        """A paid checkout of the starter monthly price: returns the new subscription."""
        customer_id = await self.customer()
        price_id = await self.starter_price()
        subscription_data: dict[str, Any] = {"metadata": {"userId": self.user_id}}
        if trial_days:
            subscription_data["trial_period_days"] = trial_days
        app = self.settings.app_url
        params: Any = {
            "mode": "subscription",
            "customer": customer_id,
            "client_reference_id": self.user_id,
            "line_items": [{"price": price_id, "quantity": 1}],
            "subscription_data": subscription_data,
            "success_url": f"{app}/billing/success?session_id={{CHECKOUT_SESSION_ID}}",
            "cancel_url": f"{app}/pricing",
        }
        trial = f" with a {trial_days}-day trial" if trial_days else ""
        session = await self.step(
            f"create a checkout session for the starter monthly price{trial}",
            lambda: self.sdk(
                "create checkout session", lambda o: self.gateway.v1.checkout.sessions.create_async(params, o)
            ),
        )
        self.echo(f"    -> {session.id} ({session.url})")
        result = await self.step(
            "the customer pays on the checkout page",
            lambda: self.control("POST", f"checkout/{session.id}/complete", {"outcome": "paid"}),
        )
        subscription = result["subscription"]
        self.echo(f"    -> subscription {subscription['id']} ({subscription['status']})")
        return subscription

    async def live_subscription(self) -> Any | None:
        customer_id = await self.customer()
        page = await self.sdk(
            "list subscriptions",
            lambda o: self.gateway.v1.subscriptions.list_async({"customer": customer_id, "limit": 10}, o),
        )
        live = [s for s in page.data if s.status in LIVE_STATUSES]
        if live:
            self.echo(f"- using subscription {live[0].id} ({live[0].status})")
            return live[0]
        return None

    async def subscription(self) -> Any:
        return await self.live_subscription() or await self.checkout()

    async def advance_to(self, moment: int, why: str) -> None:
        seconds = max(0, moment - await self.clock())
        when = datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%d %H:%M UTC")
        await self.step(
            f"advance the sandbox clock {seconds / DAY:.2f} days to {when} ({why})",
            lambda: self.control("POST", "clock/advance", {"seconds": seconds}),
        )

    async def card(self, fails: bool) -> None:
        customer_id = await self.customer()
        await self.step(
            f"the customer's card {'fails' if fails else 'works'} from now on",
            lambda: self.control("POST", f"customers/{customer_id}/payment_method", {"fails": fails}),
        )

    async def keep(self, subscription: Any) -> None:
        """Undo a pending cancellation, so the subscription renews."""
        if get(subscription, "cancel_at_period_end") or get(subscription, "cancel_at"):
            await self.update(subscription, {"cancel_at_period_end": False}, "undo the pending cancellation")

    async def update(self, subscription: Any, params: Any, what: str) -> Any:
        return await self.step(
            f"{what} on {subscription['id']}",
            lambda: self.sdk(
                "update subscription",
                lambda o: self.gateway.v1.subscriptions.update_async(subscription["id"], params, o),
            ),
        )

    async def renew(self, *, fails: bool) -> None:
        subscription = await self.subscription()
        await self.card(fails)
        await self.keep(subscription)
        current = await self.sdk(
            "retrieve subscription",
            lambda o: self.gateway.v1.subscriptions.retrieve_async(subscription["id"], None, o),
        )
        await self.advance_to(period_end(current) + FINALIZE_DELAY, "the renewal invoice is charged")

    async def deliver(self) -> None:
        """Wait until the sandbox has delivered what is pending to the service."""
        try:
            stats = await self.control("POST", "delivery/flush", {"timeout": DELIVERY_TIMEOUT_SECONDS})
        except TriggerError as exc:
            self.echo(f"- delivery not confirmed ({exc}); the sandbox keeps retrying in the background")
            return
        self.echo(f"- delivered to {stats.get('endpoint_url')} (pending: {stats.get('pending', 0)})")


# Scenarios -------------------------------------------------------------------------------------


async def _checkout_completed(run: Trigger) -> None:
    await run.checkout()


async def _checkout_expired(run: Trigger) -> None:
    customer_id = await run.customer()
    price_id = await run.starter_price()
    params: Any = {
        "mode": "subscription",
        "customer": customer_id,
        "line_items": [{"price": price_id, "quantity": 1}],
        "success_url": f"{run.settings.app_url}/billing/success",
    }
    session = await run.step(
        "create a checkout session (never paid)",
        lambda: run.sdk(
            "create checkout session", lambda o: run.gateway.v1.checkout.sessions.create_async(params, o)
        ),
    )
    await run.step(
        f"expire {session.id}",
        lambda: run.sdk(
            "expire", lambda o: run.gateway.v1.checkout.sessions.expire_async(session.id, None, o)
        ),
    )


async def _subscription_updated(run: Trigger) -> None:
    subscription = await run.subscription()
    flag = not bool(get(subscription, "cancel_at_period_end"))
    await run.update(
        subscription, {"cancel_at_period_end": flag}, f"set cancel_at_period_end={str(flag).lower()}"
    )


async def _subscription_deleted(run: Trigger) -> None:
    subscription = await run.subscription()
    await run.step(
        f"cancel {subscription['id']} now",
        lambda: run.sdk(
            "cancel subscription",
            lambda o: run.gateway.v1.subscriptions.cancel_async(subscription["id"], None, o),
        ),
    )


async def _trial_will_end(run: Trigger) -> None:
    subscription = await run.live_subscription()
    now = await run.clock()
    if subscription is None:
        subscription = await run.checkout(trial_days=load_catalog(run.settings.billing_plans_file).trial_days)
    elif (
        subscription["status"] != "trialing" or int(subscription["trial_end"]) - TRIAL_WILL_END_NOTICE <= now
    ):
        raise TriggerError(
            f"user {run.user_id} already has subscription {subscription['id']} ({subscription['status']}) "
            "that will not warn about a trial ending; run without --user for a new one"
        )
    notice = int(subscription["trial_end"]) - TRIAL_WILL_END_NOTICE
    await run.advance_to(notice, "three days before the trial ends")


async def _renewal_paid(run: Trigger) -> None:
    await run.renew(fails=False)


async def _renewal_failed(run: Trigger) -> None:
    await run.renew(fails=True)


async def _customer_updated(run: Trigger) -> None:
    customer_id = await run.customer()
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    await run.step(
        f"update {customer_id}'s description",
        lambda: run.sdk(
            "update customer",
            lambda o: run.gateway.v1.customers.update_async(
                customer_id, {"description": f"updated by billing trigger at {stamp}"}, o
            ),
        ),
    )


Scenario = Callable[[Trigger], Awaitable[None]]

SCENARIOS: dict[str, Scenario] = {
    "checkout.session.completed": _checkout_completed,
    "checkout.session.expired": _checkout_expired,
    "customer.subscription.created": _checkout_completed,
    "customer.subscription.updated": _subscription_updated,
    "customer.subscription.deleted": _subscription_deleted,
    "customer.subscription.trial_will_end": _trial_will_end,
    "customer.updated": _customer_updated,
    "invoice.paid": _renewal_paid,
    "invoice.payment_succeeded": _renewal_paid,
    "invoice.payment_failed": _renewal_failed,
}
SUPPORTED = tuple(sorted(SCENARIOS))


async def trigger(settings: Settings, event_type: str, user_id: str, echo: Echo) -> list[tuple[str, str]]:
    """Make `event_type` happen in the sandbox of the running service; the events, oldest first."""
    ensure_sandbox(settings)
    scenario = SCENARIOS[event_type]
    gateway = StripeGateway(GatewayConfig.from_settings(settings))
    try:
        async with httpx.AsyncClient(timeout=DELIVERY_TIMEOUT_SECONDS + 30) as http:
            run = Trigger(settings, gateway, http, user_id, echo)
            start = await run.clock()  # fails first, in one line, when the service is not running
            echo(f"Triggering {event_type} for user {user_id} in the sandbox at {run.sandbox_url}")
            await run.new_events(start)  # what happened before this run is not ours
            await scenario(run)
            if not any(kind == event_type for kind, _id in run.events):
                raise TriggerError(f"the scenario ran but the sandbox emitted no {event_type} event")
            await run.deliver()
            ids = [event_id for kind, event_id in run.events if kind == event_type]
            echo(f"{len(run.events)} event(s) created; {event_type}: {', '.join(ids)}")
            return run.events
    finally:
        await gateway.close()
