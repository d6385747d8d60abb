"""Host events: what a sync changed, as small JSON documents, written to the outbox.

Every event is written in the transaction that makes its change (`write_sync_events`, called
inside `sync_customer`'s write), so an event exists exactly when its change was committed.
State events (`subscription.*`, `payment.recovered`) compare the account row before and after
the sync: an unchanged state writes nothing, so a duplicate or late Stripe event adds none.
Events named by a Stripe event (`payment.failed`, `trial.ending`, ...) carry a dedupe key (the
Stripe object or event they stand for), unique in the outbox: seen twice, written once.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from billing.access import SubscriptionState, account_state_select, effective_tier
from billing.owners import owner_of
from billing.stripe_objects import field as get
from billing.stripe_objects import object_id, stripe_time
from db.engine import Database
from db.enums import SubscriptionStatus, Tier
from db.models import HostEventStatus, account_table, host_event_table

SUBSCRIPTION_CREATED = "subscription.created"
SUBSCRIPTION_UPDATED = "subscription.updated"
SUBSCRIPTION_CANCELED = "subscription.canceled"
CHECKOUT_COMPLETED = "checkout.completed"
TRIAL_ENDING = "trial.ending"
PAYMENT_FAILED = "payment.failed"
PAYMENT_ACTION_REQUIRED = "payment.action_required"
PAYMENT_RECOVERED = "payment.recovered"
USAGE_THRESHOLD = "usage.threshold"
INVOICE_PAID = "invoice.paid"
HOST_EVENT_TYPES = (
    SUBSCRIPTION_CREATED,
    SUBSCRIPTION_UPDATED,
    SUBSCRIPTION_CANCELED,
    CHECKOUT_COMPLETED,
    TRIAL_ENDING,
    PAYMENT_FAILED,
    PAYMENT_ACTION_REQUIRED,
    PAYMENT_RECOVERED,
    USAGE_THRESHOLD,
    INVOICE_PAID,
)

# Statuses under which a subscription is someone's plan (an `incomplete` one is not yet).
ENTITLED = frozenset(
    {
        SubscriptionStatus.TRIALING,
        SubscriptionStatus.ACTIVE,
        SubscriptionStatus.PAST_DUE,
        SubscriptionStatus.UNPAID,
        SubscriptionStatus.PAUSED,
    }
)
FAILING = frozenset({SubscriptionStatus.PAST_DUE, SubscriptionStatus.UNPAID})
RECOVERED = frozenset({SubscriptionStatus.ACTIVE, SubscriptionStatus.TRIALING})
# A change of any of these is a `subscription.updated` (a renewal's new period is not).
WATCHED = (
    "status",
    "tier",
    "interval",
    "stripe_price_id",
    "cancel_at_period_end",
    "canceled_at",
    "pending_tier",
    "pending_interval",
    "pending_change_at",
)


@dataclass(frozen=True)
class HostEventConfig:
    """Whether and which host events are written: present only when HOST_WEBHOOK_URL is set."""

    types: frozenset[str] | None = None  # HOST_WEBHOOK_EVENTS; None = all
    past_due_grace: timedelta = timedelta(days=7)
    kick: Callable[[], None] | None = None  # wakes the delivery worker after a commit

    def wants(self, event_type: str) -> bool:
        return self.types is None or event_type in self.types

    def notify_written(self) -> None:
        if self.kick is not None:
            self.kick()


@dataclass(frozen=True)
class StripeTrigger:
    """A Stripe event a sync applies, for the host events it names."""

    event_id: str
    type: str
    object: dict[str, Any] = field(default_factory=dict)
    created: int = 0  # Stripe's `created`: orders the events one sync applies


@dataclass(frozen=True)
class PendingHostEvent:
    type: str
    data: dict[str, Any]
    dedupe_key: str | None = None


def new_message_id() -> str:
    """The Standard Webhooks `webhook-id`: unique per event, the same on every attempt."""
    return f"msg_{uuid.uuid4().hex}"


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")


def subscription_data(
    state: SubscriptionState, *, now: datetime, past_due_grace: timedelta
) -> dict[str, Any]:
    """The account's state in the shape of the GraphQL `BillingSubscription` (enums by name)."""
    effective = effective_tier(state, now=now, past_due_grace=past_due_grace)
    pending = None
    if state.pending_tier is not None and state.pending_interval is not None:
        pending = {
            "tier": state.pending_tier.name,
            "interval": state.pending_interval.name,
            "effectiveAt": _iso(state.pending_change_at),
        }
    return {
        "status": state.status.name,
        "tier": state.tier.name,
        "effectiveTier": effective.name,
        "hasAccess": effective is not Tier.NONE,
        "interval": state.interval.name if state.interval else None,
        "priceId": state.price_id,
        "currentPeriodStart": _iso(state.current_period_start),
        "currentPeriodEnd": _iso(state.current_period_end),
        "trialEnd": _iso(state.trial_end),
        "cancelAtPeriodEnd": state.cancel_at_period_end,
        "canceledAt": _iso(state.canceled_at),
        "trialUsed": state.trial_used,
        "pendingChange": pending,
    }


def document(event_type: str, data: dict[str, Any], *, now: datetime) -> dict[str, Any]:
    """The JSON body of a host event (the Standard Webhooks payload shape)."""
    return {"type": event_type, "timestamp": _iso(now), "data": data}


# What a sync changed ----------------------------------------------------------------------------


def _status(value: Any) -> SubscriptionStatus:
    return SubscriptionStatus(value) if value else SubscriptionStatus.NONE


def state_events(changes: dict[str, tuple[Any, Any]], after_status: SubscriptionStatus) -> list[str]:
    """The state event types of one sync's changes (field -> (before, after)), in causal order."""
    if not changes:
        return []
    before = _status(changes["status"][0]) if "status" in changes else after_status
    new_subscription = "stripe_subscription_id" in changes
    found: list[str] = []
    if after_status in ENTITLED and (before not in ENTITLED or new_subscription):
        found.append(SUBSCRIPTION_CREATED)
    elif before in ENTITLED and after_status not in ENTITLED:
        found.append(SUBSCRIPTION_CANCELED)
    elif after_status in ENTITLED and any(name in changes for name in WATCHED):
        found.append(SUBSCRIPTION_UPDATED)
    if before in FAILING and after_status in RECOVERED and not new_subscription:
        found.append(PAYMENT_RECOVERED)
    return found


def trigger_events(trigger: StripeTrigger) -> list[PendingHostEvent]:
    """The host events a Stripe event names, with their dedupe keys."""
    obj = trigger.object
    kind = trigger.type
    if kind == "checkout.session.completed" and get(obj, "mode") == "subscription":
        session = get(obj, "id")
        data = {"checkoutSessionId": session, "stripeSubscriptionId": object_id(get(obj, "subscription"))}
        return [PendingHostEvent(CHECKOUT_COMPLETED, data, f"{CHECKOUT_COMPLETED}:{session}")]
    if kind == "customer.subscription.trial_will_end":
        trial_end = get(obj, "trial_end")
        data = {"stripeSubscriptionId": get(obj, "id"), "trialEnd": _iso(stripe_time(trial_end))}
        return [PendingHostEvent(TRIAL_ENDING, data, f"{TRIAL_ENDING}:{get(obj, 'id')}:{trial_end}")]
    invoice = _invoice_data(obj) if kind.startswith("invoice.") else {}
    if kind == "invoice.paid":
        return [PendingHostEvent(INVOICE_PAID, invoice, f"{INVOICE_PAID}:{get(obj, 'id')}")]
    if kind == "invoice.payment_failed":
        data = {**invoice, "attemptCount": get(obj, "attempt_count"), "stripeEventId": trigger.event_id}
        data["nextPaymentAttempt"] = _iso(stripe_time(get(obj, "next_payment_attempt")))
        return [PendingHostEvent(PAYMENT_FAILED, data, f"{PAYMENT_FAILED}:{trigger.event_id}")]
    if kind == "invoice.payment_action_required":
        data = {**invoice, "stripeEventId": trigger.event_id}
        return [
            PendingHostEvent(PAYMENT_ACTION_REQUIRED, data, f"{PAYMENT_ACTION_REQUIRED}:{trigger.event_id}")
        ]
    return []


def _invoice_data(invoice: dict[str, Any]) -> dict[str, Any]:
    return {
        "invoiceId": get(invoice, "id"),
        "stripeSubscriptionId": object_id(get(invoice, "subscription"))
        or object_id(get(get(get(invoice, "parent"), "subscription_details"), "subscription")),
        "amountDue": get(invoice, "amount_due"),
        "amountPaid": get(invoice, "amount_paid"),
        "currency": get(invoice, "currency"),
        "billingReason": get(invoice, "billing_reason"),
        "hostedInvoiceUrl": get(invoice, "hosted_invoice_url"),
    }


# Writing ----------------------------------------------------------------------------------------


async def write_sync_events(
    conn: AsyncConnection,
    database: Database,
    config: HostEventConfig,
    *,
    account_id: int | None,
    customer_id: str,
    changes: dict[str, tuple[Any, Any]],
    triggers: Sequence[StripeTrigger],
    now: datetime,
) -> int:
    """Write the host events of one sync, inside its transaction; how many were new."""
    if account_id is None:
        return 0
    in_order = sorted(triggers, key=lambda trigger: (trigger.created, trigger.event_id))
    triggered = [event for trigger in in_order for event in trigger_events(trigger)]
    if not changes and not triggered:
        return 0  # the common case (a duplicate or late event): no read, no write
    query = account_state_select(account_table.c.id == account_id).add_columns(
        account_table.c.stripe_subscription_id
    )
    row: Any = (await conn.execute(query)).mappings().first()
    if row is None:
        return 0
    state = SubscriptionState.from_row(row)
    # Causal order within one sync: the Stripe events' own host events in the order Stripe made
    # them (a checkout, a trial's notice, a failed or paid invoice), then the state they led to.
    pending = [PendingHostEvent(kind, {}) for kind in state_events(changes, state.status)]
    ordered = [*triggered, *pending]
    wanted = [event for event in ordered if config.wants(event.type)]
    if not wanted:
        return 0
    owner = owner_of(state.user_id)
    common = {
        "userId": state.user_id,
        **({"orgId": owner.id} if owner.is_organization else {}),
        "stripeCustomerId": customer_id,
        "stripeSubscriptionId": row["stripe_subscription_id"],
        "subscription": subscription_data(state, now=now, past_due_grace=config.past_due_grace),
    }
    if any(name in changes for name in WATCHED):
        # What a `subscription.*` event changed: the watched fields' values before the sync.
        common["previous"] = {
            _camel(name): _previous(name, before)
            for name, (before, _after) in changes.items()
            if name in WATCHED
        }
    return await insert_events(
        conn,
        database,
        [
            PendingHostEvent(
                event.type,
                {**common, **{key: value for key, value in event.data.items() if value is not None}},
                event.dedupe_key,
            )
            for event in wanted
        ],
        account_id=account_id,
        user_id=state.user_id,
        now=now,
    )


async def insert_events(
    conn: AsyncConnection,
    database: Database,
    events: Iterable[PendingHostEvent],
    *,
    account_id: int | None,
    user_id: str | None,
    now: datetime,
) -> int:
    """Insert events into the outbox in order; one whose dedupe key is there already is skipped."""
    insert = (postgresql.insert if database.is_postgres else sqlite.insert)(host_event_table)
    written = 0
    for event in events:
        statement = insert.values(
            message_id=new_message_id(),
            type=event.type,
            account_id=account_id,
            user_id=user_id,
            dedupe_key=event.dedupe_key,
            payload=document(event.type, event.data, now=now),
            created_at=now,
            status=HostEventStatus.PENDING.value,
            attempts=0,
            next_attempt_at=now,
        ).on_conflict_do_nothing(index_elements=["dedupe_key"])
        result = await conn.execute(statement)
        written += int(result.rowcount or 0)
    return written


ENUM_FIELDS = frozenset({"status", "tier", "interval", "pending_tier", "pending_interval"})


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _previous(name: str, value: Any) -> Any:
    """A stored value as the GraphQL shape shows it: enums by name, times in ISO 8601."""
    if isinstance(value, datetime):
        return _iso(value)
    if name in ENUM_FIELDS and isinstance(value, str):
        return value.upper()
    return value
