"""An organisation's seats: the quantity of its per-seat plan, set by the host app's backend.

- `set_seats`: with a live subscription on a per-seat tier, the plan item's quantity becomes
  `seats` with Stripe's prorations invoiced at once (`always_invoice`: added seats are charged
  now, removed seats credited to the customer's balance, which pays the next invoice). A count
  outside the tier's `min_seats`..`max_seats` is BAD_USER_INPUT with nothing sent. The caller's
  idempotency key goes to Stripe (derived per organisation), so a retry of a call that succeeded
  changes nothing, even after a later change; a count already in place sends nothing at all; the
  key reused with other arguments is IDEMPOTENCY_CONFLICT.
  Without a live subscription the count is stored, and the next checkout starts with it.
- `preview_seat_change`: Stripe's invoice preview of the same update, with the moment Stripe
  prorated it; `set_seats` given that `proration_date` charges exactly the preview's amount.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import stripe
from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite

from billing.access import SubscriptionState, is_user_id, load_subscription
from billing.clock import Clock, utcnow
from billing.customer_locks import CustomerLocks
from billing.errors import BillingError, ErrorCode
from billing.owners import org_key, owner_columns
from billing.plan_changes.live import Account, LiveSubscription, change_lock, load_account, load_live
from billing.plan_changes.model import CHANGEABLE_STATUSES, PreviewLine
from billing.plan_changes.previews import preview_lines, proration_time
from billing.plan_changes.stripe_calls import synced_state
from billing.plans import Catalog, Plan
from billing.realtime import publish_account_change
from billing.stripe_gateway import StripeGateway, idempotency_key
from billing.stripe_objects import field as get
from billing.stripe_objects import stripe_time
from billing.stripe_state import LIVE_STATUSES
from db.engine import Database
from db.models import account_table

MAX_SEATS = 1_000_000
MAX_KEY_LENGTH = 255
# Seats change while the subscription bills (or in its trial, where nothing is prorated).
SEAT_STATUSES = CHANGEABLE_STATUSES


@dataclass(frozen=True, slots=True)
class SeatChangePreview:
    seats: int
    previous_seats: int
    currency: str
    amount_due: int  # charged now, in cents; negative: credited to the customer's balance
    proration_date: datetime | None  # pass it to set_seats to be charged exactly this
    lines: tuple[PreviewLine, ...]


def _bad(message: str, field: str, **extensions: Any) -> BillingError:
    return BillingError(message, code=ErrorCode.BAD_USER_INPUT, field=field, **extensions)


def _check_input(org_id: str, seats: int) -> None:
    if not is_user_id(org_id) or len(org_key(org_id)) > MAX_KEY_LENGTH:
        raise _bad("orgId must be 1 to 251 characters, none of them control characters", "orgId")
    if not 1 <= seats <= MAX_SEATS:
        raise _bad(f"seats must be between 1 and {MAX_SEATS}", "seats")


def _check_bounds(plan: Plan, seats: int) -> None:
    if not plan.seats_allowed(seats):
        bounds = f"at least {plan.min_seats}" + (f" and at most {plan.max_seats}" if plan.max_seats else "")
        raise _bad(
            f"The {plan.name} plan is sold for {bounds} seats.",
            "seats",
            minSeats=plan.min_seats,
            maxSeats=plan.max_seats,
        )


def checkout_seats(plan: Plan, stored: int | None) -> int:
    """The quantity a checkout of `plan` starts with: the owner's stored seats, at least the minimum."""
    if not plan.per_seat:
        return 1
    seats = max(plan.min_seats, stored or 1)
    _check_bounds(plan, seats)
    return seats


async def stored_seats(database: Database, owner_key: str) -> int | None:
    async with database.read() as conn:
        found = (
            await conn.execute(select(account_table.c.seats).where(account_table.c.user_id == owner_key))
        ).scalar_one_or_none()
    return None if found is None else int(found)


async def _per_seat_live(
    database: Database, gateway: StripeGateway, catalog: Catalog, key: str
) -> tuple[LiveSubscription, Plan] | None:
    """The organisation's live subscription and its per-seat plan, or None (no subscription, or a
    plan that is not priced per seat: the seat count is then only stored)."""
    try:
        account = await load_account(database, key)
        live = await load_live(database, gateway, account, SEAT_STATUSES)
    except BillingError as exc:
        if exc.code is ErrorCode.NO_SUBSCRIPTION:
            return None
        raise
    plan = catalog.plans.get(live.plan[0]) if live.plan is not None else None
    if plan is None or not plan.per_seat:
        return None
    return live, plan


def _item_update(live: LiveSubscription, seats: int, proration_date: int | None) -> dict[str, Any]:
    params: dict[str, Any] = {
        "items": [{"id": get(live.item, "id"), "quantity": seats}],
        "proration_behavior": "always_invoice",
    }
    if proration_date is not None:
        if not live.period[0] <= proration_date <= live.period[1]:
            raise _bad("prorationDate must be within the current billing period", "prorationDate")
        params["proration_date"] = proration_date
    return params


async def preview_seat_change(
    *,
    database: Database,
    gateway: StripeGateway,
    catalog: Catalog,
    org_id: str,
    seats: int,
) -> SeatChangePreview:
    """What `set_seats(seats)` charges now. NO_SUBSCRIPTION without a live per-seat subscription."""
    _check_input(org_id, seats)
    found = await _per_seat_live(database, gateway, catalog, org_key(org_id))
    if found is None:
        raise BillingError(
            "The organisation has no live subscription priced per seat.", code=ErrorCode.NO_SUBSCRIPTION
        )
    live, plan = found
    _check_bounds(plan, seats)
    params: Any = {
        "subscription": live.account.subscription_id,
        "subscription_details": _item_update(live, seats, None),
    }
    preview = await gateway.call(
        lambda o: gateway.v1.invoices.create_preview_async(params, o), what="preview seat change"
    )
    lines = preview_lines(preview)
    return SeatChangePreview(
        seats=seats,
        previous_seats=int(get(live.item, "quantity") or 1),
        currency=str(get(preview, "currency") or catalog.currency),
        amount_due=sum(line.amount for line in lines if line.proration),
        proration_date=stripe_time(proration_time(preview)) if lines else None,
        lines=tuple(line for line in lines if line.proration),
    )


async def set_seats(
    *,
    database: Database,
    gateway: StripeGateway,
    locks: CustomerLocks,
    catalog: Catalog,
    org_id: str,
    seats: int,
    key: str,
    proration_date: datetime | None = None,
    clock: Clock = utcnow,
) -> SubscriptionState:
    """Make `seats` the organisation's seat count (see the module's docstring)."""
    _check_input(org_id, seats)
    if not 0 < len(key) <= MAX_KEY_LENGTH:
        raise _bad(f"idempotencyKey must be 1 to {MAX_KEY_LENGTH} characters", "idempotencyKey")
    owner = org_key(org_id)
    found = await _per_seat_live(database, gateway, catalog, owner)
    if found is None:
        await _store_seats(database, owner, seats, clock())
        return await load_subscription(database, owner)
    live, plan = found
    _check_bounds(plan, seats)
    account: Account = live.account
    async with locks.hold(change_lock(account.customer_id)):
        live = await load_live(database, gateway, account, SEAT_STATUSES)  # as Stripe has it now
        if int(get(live.item, "quantity") or 1) != seats:
            at = None if proration_date is None else int(proration_date.timestamp())
            params: Any = _item_update(live, seats, at)
            try:
                await gateway.call(
                    lambda o: gateway.v1.subscriptions.update_async(account.subscription_id, params, o),
                    idempotency_key=idempotency_key("subscription.seats", org_id, key),
                    what="set seats",
                )
            except BillingError as exc:
                if isinstance(exc.__cause__, stripe.IdempotencyError):
                    raise BillingError(
                        "This idempotencyKey was used with other arguments.",
                        code=ErrorCode.IDEMPOTENCY_CONFLICT,
                        field="idempotencyKey",
                    ) from None
                raise
        return await synced_state(database, gateway, locks, clock, account)


async def _store_seats(database: Database, owner: str, seats: int, now: datetime) -> None:
    """The seat count of an owner without a live subscription (the row is made if need be)."""
    insert = (postgresql.insert if database.is_postgres else sqlite.insert)(account_table)
    async with database.write() as conn:
        await conn.execute(
            insert.values(
                **owner_columns(owner), seats=seats, created_at=now, updated_at=now
            ).on_conflict_do_nothing(index_elements=["user_id"])
        )
        c = account_table.c
        live = [status.value for status in LIVE_STATUSES]
        changed = await conn.execute(
            update(account_table)
            .where(c.user_id == owner, c.status.not_in(live))
            .values(seats=seats, updated_at=now)
            .returning(c.id)
        )
        for (account_id,) in changed.all():
            await publish_account_change(conn, database, account_id)
