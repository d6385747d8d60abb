"""Checkout, its confirmation, and the customer portal: the Stripe-hosted pages a user is sent to.

- `create_checkout_session`: a Stripe Checkout Session in subscription mode for one tier and
  interval. The customer is got or created once per user (`billing.customers`); then Stripe's
  view of the customer is read through `sync_customer` (the database can lag the webhooks), so
  a user with a live subscription is refused (ALREADY_SUBSCRIBED; the database is synced then)
  and a user who ever had a trial gets none again. That read is a dry run: a checkout that
  fails afterwards has written nothing. The user's other open sessions are expired before the
  new one is created, under a per-customer lock, so two tabs cannot pay for two subscriptions.
- `confirm_checkout_session`: the success page's call. Only a session of the viewer's own
  customer is accepted; the account is synced now rather than when the webhook arrives.
- `create_portal_session`: the customer portal with the catalog's configuration (metadata
  `catalog=billing`, looked up once per process).

Stripe is never called with a database transaction open; a Stripe failure (mapped by the
gateway to BILLING_PROVIDER_UNAVAILABLE or CARD_DECLINED) leaves the database consistent: at
most a customer linked to its account, which the next call reuses.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any
from weakref import WeakKeyDictionary

from stripe.params.billing_portal import SessionCreateParams as PortalSessionCreateParams
from stripe.params.checkout import (
    SessionCreateParams,
    SessionCreateParamsLineItem,
    SessionCreateParamsSubscriptionData,
)

from billing.access import SubscriptionState, load_subscription
from billing.catalog import MANAGED, PAGE
from billing.clock import Clock, utcnow
from billing.customer_locks import CustomerLocks
from billing.customers import (
    Identity,
    get_or_create_customer,
    is_missing,
    linked_customer,
    missing_param,
)
from billing.customers import existing_customer as existing_customer_of
from billing.errors import BillingError, ErrorCode
from billing.ledger import MUTATION
from billing.owners import customer_metadata
from billing.plans import Catalog
from billing.seats import checkout_seats
from billing.settings import Settings
from billing.stripe_gateway import StripeGateway, random_idempotency_key
from billing.stripe_objects import field as get
from billing.stripe_objects import metadata, object_id
from billing.sync import SyncResult, sync_customer
from db.engine import Database
from db.enums import BillingInterval, Tier

log = logging.getLogger("billing.checkout")

# Stripe's Checkout Session ids: `cs_test_...` / `cs_live_...`, letters, digits and underscores.
SESSION_ID = re.compile(r"cs_[A-Za-z0-9_]{1,250}")
NOT_YOUR_SESSION = "No checkout session of yours has this id."


def success_url(settings: Settings) -> str:
    return f"{settings.app_url}/billing/success?session_id={{CHECKOUT_SESSION_ID}}"


def cancel_url(settings: Settings) -> str:
    return f"{settings.app_url}/pricing"


def portal_return_url(settings: Settings) -> str:
    return f"{settings.app_url}/billing"


@dataclass(frozen=True, slots=True)
class CheckoutSessionInfo:
    id: str
    url: str


@dataclass(frozen=True, slots=True)
class PortalSessionInfo:
    url: str


# Checkout -----------------------------------------------------------------------------------


async def create_checkout_session(
    *,
    database: Database,
    gateway: StripeGateway,
    locks: CustomerLocks,
    catalog: Catalog,
    settings: Settings,
    user: Identity,
    tier: Tier,
    interval: BillingInterval,
    clock: Clock = utcnow,
) -> CheckoutSessionInfo:
    """A new Checkout Session for `tier` at `interval`; the user's other open sessions expire.

    INVALID_PLAN for Tier.NONE (or a tier the catalog does not sell), ALREADY_SUBSCRIBED when
    Stripe shows a live subscription, NO_BILLING_ACCOUNT never (the customer is created).
    """
    if tier is Tier.NONE or tier not in catalog.plans:
        raise BillingError(
            f"{tier.name} is not a plan that can be bought", code=ErrorCode.INVALID_PLAN, tier=tier.name
        )
    for _attempt in range(2):
        customer_id = await get_or_create_customer(
            database=database, gateway=gateway, locks=locks, catalog=catalog, user=user, clock=clock
        )
        async with locks.hold(f"checkout:{customer_id}"):
            # Stripe's view, read under the checkout lock (a session paid in another tab shows
            # here) and without writing: a checkout that fails later leaves the database as it was.
            seen = await _sync(database, gateway, locks, customer_id, user.id, clock, dry_run=True)
            if seen.customer_deleted:
                await _sync(database, gateway, locks, customer_id, user.id, clock)  # unlinks it
                continue  # the next pass creates a new customer
            if seen.state is not None and seen.state.live_subscription_ids:
                if seen.changes:  # the webhook is late: let the database catch up now
                    await _sync(database, gateway, locks, customer_id, user.id, clock)
                raise _already_subscribed(status=seen.state.status.name, tier=seen.state.tier.name)
            return await _new_session(
                database, gateway, catalog, settings, user.id, customer_id, seen, tier, interval
            )
    raise BillingError(
        "The billing account changed while it was being set up; try again.",
        code=ErrorCode.BILLING_PROVIDER_UNAVAILABLE,
    )


async def _new_session(
    database: Database,
    gateway: StripeGateway,
    catalog: Catalog,
    settings: Settings,
    user_id: str,
    customer_id: str,
    seen: SyncResult,
    tier: Tier,
    interval: BillingInterval,
) -> CheckoutSessionInfo:
    # A trial only for a user who never had one: Stripe's history (the sync) or the account's.
    account = await load_subscription(database, user_id)
    trial_used = account.trial_used or (seen.state is not None and seen.state.trial_used)
    trial_days = 0 if trial_used else catalog.trial_days
    seats = checkout_seats(catalog.plan(tier), account.seats)  # 1 unless the tier is per seat
    prices = await _price_ids(gateway, catalog, tier, interval)
    await _expire_open_sessions(gateway, customer_id)
    params = _session_params(catalog, settings, user_id, customer_id, tier, interval, prices, trial_days)
    params["line_items"][0]["quantity"] = seats
    session = await gateway.call(
        lambda o: gateway.v1.checkout.sessions.create_async(params, o),
        idempotency_key=random_idempotency_key("checkout.session"),
        what="create checkout session",
    )
    if session.url is None:  # pragma: no cover - hosted sessions always have a URL
        raise BillingError("Stripe returned a checkout session without a URL", code=ErrorCode.INVALID_REQUEST)
    return CheckoutSessionInfo(id=session.id, url=session.url)


async def _sync(
    database: Database,
    gateway: StripeGateway,
    locks: CustomerLocks,
    customer_id: str,
    user_id: str,
    clock: Clock,
    invoice_ids: list[str] | None = None,
    *,
    dry_run: bool = False,
) -> SyncResult:
    result = await sync_customer(
        database=database,
        gateway=gateway,
        locks=locks,
        customer_id=customer_id,
        now=clock(),
        user_id_hint=user_id,
        invoice_ids=invoice_ids or (),
        dry_run=dry_run,
        cause=MUTATION,
    )
    if result.unknown_customer and not result.customer_deleted:
        log.error("user %s: linked customer %s does not exist in Stripe", user_id, customer_id)
        raise BillingError(
            "The billing account's Stripe customer does not exist.", code=ErrorCode.INVALID_REQUEST
        )
    return result


def _already_subscribed(**extensions: Any) -> BillingError:
    return BillingError(
        "You already have a subscription: change plan or manage it in the billing portal.",
        code=ErrorCode.ALREADY_SUBSCRIBED,
        **extensions,
    )


async def _price_ids(
    gateway: StripeGateway, catalog: Catalog, tier: Tier, interval: BillingInterval
) -> list[str]:
    """The licensed price of the tier and interval first, then the tier's metered prices.

    Metered prices are monthly for every plan: on an annual plan the subscription mixes intervals
    (Stripe's flexible billing mode, asked for in `_session_params`), the plan renewing yearly
    and the usage invoiced monthly, so annual subscribers are billed for what they use too.
    """
    plan = catalog.plan(tier)
    licensed_key = catalog.price(tier, interval).lookup_key
    metered_keys = [price.lookup_key for price in plan.metered_prices.values()]
    page = await gateway.call(
        lambda o: gateway.v1.prices.list_async(
            {"active": True, "lookup_keys": [licensed_key, *metered_keys], "limit": PAGE}, o
        ),
        what="list prices",
    )
    by_key = {price.lookup_key: price for price in page.data if price.lookup_key}
    missing = [key for key in (licensed_key, *metered_keys) if key not in by_key]
    if missing:
        log.error("checkout: no active Stripe price for %s; run `billing catalog sync`", ", ".join(missing))
        raise BillingError("This plan is not on sale right now.", code=ErrorCode.INVALID_PLAN, tier=tier.name)
    return [by_key[licensed_key].id, *(by_key[key].id for key in metered_keys)]


async def _expire_open_sessions(gateway: StripeGateway, customer_id: str) -> None:
    """Expire the customer's open sessions. One already paid means a subscription exists."""
    page = await gateway.call(
        lambda o: gateway.v1.checkout.sessions.list_async(
            {"customer": customer_id, "status": "open", "limit": PAGE}, o
        ),
        what="list open checkout sessions",
    )
    open_ids = [session.id async for session in page.auto_paging_iter()]
    for session_id in open_ids:
        await _expire(gateway, session_id)


async def _expire(gateway: StripeGateway, session_id: str) -> None:
    try:
        await gateway.call(
            lambda o: gateway.v1.checkout.sessions.expire_async(session_id, None, o),
            what="expire checkout session",
        )
    except BillingError as exc:
        if exc.code is not ErrorCode.INVALID_REQUEST:
            raise
        current = await gateway.call(
            lambda o: gateway.v1.checkout.sessions.retrieve_async(session_id, None, o),
            what="retrieve checkout session",
        )
        if current.status == "complete":  # paid in another tab since the sync
            raise _already_subscribed() from exc
        if current.status != "expired":
            raise


def _session_params(
    catalog: Catalog,
    settings: Settings,
    user_id: str,
    customer_id: str,
    tier: Tier,
    interval: BillingInterval,
    price_ids: list[str],
    trial_days: int,
) -> SessionCreateParams:
    licensed, *metered = price_ids
    line_items: list[SessionCreateParamsLineItem] = [{"price": licensed, "quantity": 1}]
    # Metered prices take no quantity: usage reported to their meters is billed monthly.
    line_items += [{"price": price} for price in metered]
    subscription_data: SessionCreateParamsSubscriptionData = {
        "metadata": customer_metadata(user_id),  # userId, or orgId for an organisation
        # Stripe's default in this API version, said outright: an annual plan with monthly
        # metered prices mixes intervals, which only flexible billing mode allows.
        "billing_mode": {"type": "flexible"},
    }
    if trial_days > 0:
        subscription_data["trial_period_days"] = trial_days
    params: SessionCreateParams = {
        "mode": "subscription",
        "customer": customer_id,
        "client_reference_id": user_id,
        "line_items": line_items,
        "allow_promotion_codes": True,
        "billing_address_collection": (
            "required" if catalog.checkout.billing_address_collection == "required" else "auto"
        ),
        "subscription_data": subscription_data,
        "metadata": {**customer_metadata(user_id), "tier": tier.value, "interval": interval.value},
        "success_url": success_url(settings),
        "cancel_url": cancel_url(settings),
    }
    if catalog.checkout.automatic_tax:
        params["automatic_tax"] = {"enabled": True}
        params["customer_update"] = {"address": "auto"}  # tax needs the address Checkout collects
    return params


# Confirmation -------------------------------------------------------------------------------


async def confirm_checkout_session(
    *,
    database: Database,
    gateway: StripeGateway,
    locks: CustomerLocks,
    user_id: str,
    session_id: str,
    clock: Clock = utcnow,
) -> SubscriptionState:
    """Sync the account of the session's customer now and return the fresh state.

    NO_BILLING_ACCOUNT when the user has no customer; BAD_USER_INPUT, with one message, for an
    id that is malformed, unknown, or another customer's: the answer never tells whether a
    session exists. Nothing is written for a refused id.
    """
    if not SESSION_ID.fullmatch(session_id):
        raise _not_yours()
    customer_id = await linked_customer(database, user_id)
    if customer_id is None:
        raise BillingError("You have no billing account yet.", code=ErrorCode.NO_BILLING_ACCOUNT)
    try:
        session = await gateway.call(
            lambda o: gateway.v1.checkout.sessions.retrieve_async(
                session_id, {"expand": ["subscription"]}, o
            ),
            what="retrieve checkout session",
        )
    except BillingError as exc:
        if is_missing(exc):
            raise _not_yours() from None
        raise
    if object_id(session.customer) != customer_id:
        log.warning("user %s asked to confirm checkout session %s of another customer", user_id, session_id)
        raise _not_yours()
    # The first invoice, so `viewer.invoices` shows it now too.
    invoice = object_id(get(session, "invoice")) or object_id(
        get(get(session, "subscription"), "latest_invoice")
    )
    await _sync(database, gateway, locks, customer_id, user_id, clock, [invoice] if invoice else None)
    return await load_subscription(database, user_id)


def _not_yours() -> BillingError:
    return BillingError(NOT_YOUR_SESSION, code=ErrorCode.BAD_USER_INPUT, field="sessionId")


# Customer portal ----------------------------------------------------------------------------


class PortalConfigurations:
    """The id of the catalog's portal configuration (metadata `catalog=billing`), per gateway.

    Looked up once and kept for the life of the process (`billing catalog sync` updates the
    configuration in place); forgotten when Stripe no longer knows it.
    """

    def __init__(self) -> None:
        self._ids: WeakKeyDictionary[StripeGateway, str] = WeakKeyDictionary()
        self.lookups = 0  # Stripe list calls made, for tests and observability

    async def get(self, gateway: StripeGateway) -> str:
        cached = self._ids.get(gateway)
        if cached is not None:
            return cached
        self.lookups += 1
        page = await gateway.call(
            lambda o: gateway.v1.billing_portal.configurations.list_async({"active": True, "limit": PAGE}, o),
            what="list portal configurations",
        )
        async for configuration in page.auto_paging_iter():
            if all(metadata(configuration).get(key) == value for key, value in MANAGED.items()):
                self._ids[gateway] = configuration.id
                return configuration.id
        log.error(
            "no customer portal configuration with metadata catalog=billing; run `billing catalog sync`"
        )
        raise BillingError("The billing portal is not configured.", code=ErrorCode.INVALID_REQUEST)

    def forget(self, gateway: StripeGateway) -> None:
        self._ids.pop(gateway, None)


portal_configurations = PortalConfigurations()


async def create_portal_session(
    *,
    database: Database,
    gateway: StripeGateway,
    settings: Settings,
    user: Identity,
    configurations: PortalConfigurations = portal_configurations,
    clock: Clock = utcnow,
) -> PortalSessionInfo:
    """A customer-portal session returning to `${APP_URL}/billing`. NO_BILLING_ACCOUNT without a customer."""
    customer_id = await existing_customer_of(database=database, gateway=gateway, user=user, clock=clock)
    if customer_id is None:
        raise _no_account()
    for attempt in range(2):
        params: PortalSessionCreateParams = {
            "customer": customer_id,
            "return_url": portal_return_url(settings),
            "configuration": await configurations.get(gateway),
        }
        try:
            session = await _portal_session(gateway, params)
        except BillingError as exc:
            param = missing_param(exc)
            if param == "customer":
                raise _no_account() from None  # deleted in Stripe; the webhook unlinks it
            if param == "configuration" and attempt == 0:
                configurations.forget(gateway)
                continue
            raise
        return PortalSessionInfo(url=session.url)
    raise AssertionError("unreachable")  # pragma: no cover


async def _portal_session(gateway: StripeGateway, params: PortalSessionCreateParams) -> Any:
    return await gateway.call(
        lambda o: gateway.v1.billing_portal.sessions.create_async(params, o), what="create portal session"
    )


def _no_account() -> BillingError:
    return BillingError(
        "You have no billing account yet: subscribe first.", code=ErrorCode.NO_BILLING_ACCOUNT
    )
