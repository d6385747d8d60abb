"""The service's tables.

Constraint and index names come from one naming convention, so migrations can refer to them
by name on PostgreSQL and SQLite alike.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel

from db.enums import BillingInterval, EventStatus, SubscriptionStatus, Tier, sql_in
from db.types import UTCDateTime

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLModel keeps one MetaData for every table class; give it the convention before any table
# is declared (names are resolved when a constraint attaches to its table).
metadata: MetaData = SQLModel.metadata
metadata.naming_convention = NAMING_CONVENTION

BigId = BigInteger().with_variant(Integer(), "sqlite")  # SQLite autoincrements INTEGER only
Json = JSON().with_variant(JSONB(), "postgresql")


class BillingAccount(SQLModel, table=True):
    """One row per billing owner (billing/owners.py): a user of the host app or an organisation.

    `user_id` is the owner key: the user's id, or `org:<organisation id>`; `owner_kind` says which.
    """

    __tablename__ = "billing_account"
    __table_args__ = (
        UniqueConstraint("user_id"),
        CheckConstraint(
            "(owner_kind = 'organization' AND substr(user_id, 1, 4) = 'org:') OR "
            "(owner_kind = 'user' AND substr(user_id, 1, 4) <> 'org:')",
            name="owner",
        ),
        UniqueConstraint("stripe_customer_id"),
        UniqueConstraint("stripe_subscription_id"),
        CheckConstraint(f"tier IN ({sql_in(Tier)})", name="tier"),
        CheckConstraint(f"interval IS NULL OR interval IN ({sql_in(BillingInterval)})", name="interval"),
        CheckConstraint(f"status IN ({sql_in(SubscriptionStatus)})", name="status"),
        CheckConstraint(f"pending_tier IS NULL OR pending_tier IN ({sql_in(Tier)})", name="pending_tier"),
        CheckConstraint(
            f"pending_interval IS NULL OR pending_interval IN ({sql_in(BillingInterval)})",
            name="pending_interval",
        ),
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=BigId)
    user_id: str = Field(sa_type=String(255))
    # The database's default (not SQLAlchemy's), so an INSERT that names no owner kind is a user's.
    owner_kind: str = Field(sa_type=String(16), sa_column_kwargs={"server_default": "user"})
    email: str | None = Field(default=None, sa_type=String(320))
    name: str | None = Field(default=None, sa_type=String(255))
    stripe_customer_id: str | None = Field(default=None, sa_type=String(255))
    stripe_subscription_id: str | None = Field(default=None, sa_type=String(255))
    stripe_price_id: str | None = Field(default=None, sa_type=String(255))
    tier: str = Field(default=Tier.NONE.value, sa_type=String(16))
    interval: str | None = Field(default=None, sa_type=String(16))
    status: str = Field(default=SubscriptionStatus.NONE.value, sa_type=String(32))
    current_period_start: datetime | None = Field(default=None, sa_type=UTCDateTime)
    current_period_end: datetime | None = Field(default=None, sa_type=UTCDateTime)
    trial_end: datetime | None = Field(default=None, sa_type=UTCDateTime)
    cancel_at_period_end: bool = Field(default=False)
    canceled_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    trial_used: bool = Field(default=False)
    seats: int | None = Field(default=None)  # the licensed item's quantity while subscribed
    # A plan change scheduled for the period end (a subscription schedule's next phase).
    stripe_schedule_id: str | None = Field(default=None, sa_type=String(255))
    pending_tier: str | None = Field(default=None, sa_type=String(16))
    pending_interval: str | None = Field(default=None, sa_type=String(16))
    pending_change_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    synced_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    created_at: datetime = Field(sa_type=UTCDateTime)
    updated_at: datetime = Field(sa_type=UTCDateTime)


class PlanChangeQuote(SQLModel, table=True):
    """The proration date of a user's latest preview of a plan change, kept for a few minutes.

    `changePlan` sends it to Stripe so the change charges exactly what the preview showed,
    whichever service process answers. One row per account and target plan.
    """

    __tablename__ = "plan_change_quote"
    __table_args__ = (
        CheckConstraint(f"tier IN ({sql_in(Tier)})", name="tier"),
        CheckConstraint(f"interval IN ({sql_in(BillingInterval)})", name="interval"),
    )

    account_id: int = Field(
        primary_key=True, foreign_key="billing_account.id", ondelete="CASCADE", sa_type=BigId
    )
    tier: str = Field(primary_key=True, sa_type=String(16))
    interval: str = Field(primary_key=True, sa_type=String(16))
    stripe_subscription_id: str = Field(sa_type=String(255))
    stripe_price_id: str = Field(sa_type=String(255))  # the price paid when the preview was made
    proration_date: datetime = Field(sa_type=UTCDateTime)  # Stripe's time
    expires_at: datetime = Field(sa_type=UTCDateTime)
    created_at: datetime = Field(sa_type=UTCDateTime)


class UsageRecord(SQLModel, table=True):
    """One metered use of a feature, recorded once per idempotency key."""

    __tablename__ = "usage_record"
    __table_args__ = (
        UniqueConstraint("account_id", "idempotency_key"),
        CheckConstraint("quantity > 0", name="quantity_positive"),
        # Serves "sum of feature F for account A between t1 and t2".
        Index(None, "account_id", "feature", "recorded_at"),
        Index(None, "reported_at", "recorded_at"),
        # Serves the reporter's "records of metered features not yet aggregated".
        Index(None, "report_id", "feature"),
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=BigId)
    account_id: int = Field(foreign_key="billing_account.id", ondelete="CASCADE", sa_type=BigId)
    feature: str = Field(sa_type=String(64))
    quantity: int = Field(sa_type=BigInteger)
    recorded_at: datetime = Field(sa_type=UTCDateTime)
    idempotency_key: str = Field(sa_type=String(255))
    reported_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    created_at: datetime = Field(sa_type=UTCDateTime)
    # The aggregate (`usage_report`) that carries this record to Stripe; NULL until aggregated.
    # Records of features that are not metered stay NULL: nothing reports them.
    report_id: str | None = Field(default=None, foreign_key="usage_report.id", sa_type=String(40))


class UsageReportStatus(StrEnum):
    """Life of a `usage_report` (one meter event for Stripe)."""

    PENDING = "pending"  # waiting to be sent (first time, or after a backoff)
    SENDING = "sending"  # claimed by a reporter until `lease_expires_at`
    REPORTED = "reported"  # Stripe accepted it (or already had its identifier)
    EXPIRED = "expired"  # older than Stripe's 35-day window before it was accepted: flagged
    FAILED = "failed"  # refused by Stripe again and again: flagged for a person


class UsageRollup(SQLModel, table=True):
    """Hourly sums of `usage_record`, upserted in the same transaction as each insert.

    A window's usage is the rollups of the whole hours inside it plus the raw records of the
    partial hours at its edges, so reads never scan every record.
    """

    __tablename__ = "usage_rollup"
    __table_args__ = (CheckConstraint("quantity >= 0", name="quantity_non_negative"),)

    account_id: int = Field(
        foreign_key="billing_account.id", ondelete="CASCADE", primary_key=True, sa_type=BigId
    )
    feature: str = Field(primary_key=True, sa_type=String(64))
    hour: datetime = Field(primary_key=True, sa_type=UTCDateTime)  # the hour's start, UTC
    quantity: int = Field(sa_type=BigInteger)


class UsageWindowTotal(SQLModel, table=True):
    """The running total of a feature's usage per account and quota window, upserted in the same
    transaction as each record (billing/usage/window_totals.py): what quota reads read, and its
    old and new values tell when a record crosses 80% or 100% of the quota (`usage.threshold`)."""

    __tablename__ = "usage_window_total"
    __table_args__ = (CheckConstraint("quantity >= 0", name="quantity_non_negative"),)

    account_id: int = Field(
        foreign_key="billing_account.id", ondelete="CASCADE", primary_key=True, sa_type=BigId
    )
    feature: str = Field(primary_key=True, sa_type=String(64))
    window_start: datetime = Field(primary_key=True, sa_type=UTCDateTime)
    window_end: datetime = Field(primary_key=True, sa_type=UTCDateTime)
    quantity: int = Field(sa_type=BigInteger)


class UsageReport(SQLModel, table=True):
    """One meter event for Stripe: the sum of a customer's records of one feature in one minute.

    Its id is the meter event's `identifier`, stable across retries, so Stripe deduplicates a
    resend after a lost response; the status makes exactly-once our job beyond Stripe's 24 hours.
    """

    __tablename__ = "usage_report"
    __table_args__ = (
        CheckConstraint(f"status IN ({sql_in(UsageReportStatus)})", name="status"),
        CheckConstraint("quantity > 0", name="quantity_positive"),
        Index(None, "status", "next_attempt_at"),
        Index(None, "account_id", "feature", "minute"),
    )

    id: str = Field(primary_key=True, sa_type=String(40))  # "ur_<32 hex>", the meter event identifier
    account_id: int = Field(foreign_key="billing_account.id", ondelete="CASCADE", sa_type=BigId)
    feature: str = Field(sa_type=String(64))
    event_name: str = Field(sa_type=String(100))
    stripe_customer_id: str | None = Field(default=None, sa_type=String(255))
    minute: datetime = Field(sa_type=UTCDateTime)  # the minute its records fall in
    event_time: datetime = Field(sa_type=UTCDateTime)  # the meter event's timestamp
    quantity: int = Field(sa_type=BigInteger)
    status: str = Field(default=UsageReportStatus.PENDING.value, sa_type=String(16))
    attempts: int = Field(default=0)
    next_attempt_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    lease_expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    last_error: str | None = Field(default=None, sa_type=Text)
    created_at: datetime = Field(sa_type=UTCDateTime)
    reported_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class StripeEvent(SQLModel, table=True):
    """The inbox: every Stripe event received, stored once by its id."""

    __tablename__ = "stripe_event"
    __table_args__ = (
        CheckConstraint(f"status IN ({sql_in(EventStatus)})", name="status"),
        Index(None, "status", "next_attempt_at"),
    )

    id: str = Field(primary_key=True, sa_type=String(255))
    type: str = Field(sa_type=String(128))
    stripe_created: datetime = Field(sa_type=UTCDateTime)
    received_at: datetime = Field(sa_type=UTCDateTime)
    status: str = Field(default=EventStatus.PENDING.value, sa_type=String(16))
    attempts: int = Field(default=0)
    next_attempt_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    lease_expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    last_error: str | None = Field(default=None, sa_type=Text)
    payload: dict[str, Any] = Field(sa_type=Json)
    # The W3C traceparent of the request that stored it, when tracing is on: the worker's apply
    # span is that ingest span's child (Stripe sends no trace context).
    trace_context: str | None = Field(default=None, sa_type=String(64))


class Invoice(SQLModel, table=True):
    """Stripe invoices of our customers, kept by the webhook sync for `viewer.invoices`."""

    __tablename__ = "invoice"
    __table_args__ = (Index(None, "stripe_customer_id", "created"),)

    id: str = Field(primary_key=True, sa_type=String(255))  # Stripe's invoice id
    stripe_customer_id: str = Field(sa_type=String(255))
    stripe_subscription_id: str | None = Field(default=None, sa_type=String(255))
    number: str | None = Field(default=None, sa_type=String(64))
    status: str = Field(sa_type=String(32))
    billing_reason: str | None = Field(default=None, sa_type=String(64))
    currency: str = Field(sa_type=String(3))
    amount_due: int = Field(sa_type=BigInteger)
    amount_paid: int = Field(sa_type=BigInteger)
    amount_remaining: int = Field(sa_type=BigInteger)
    total: int = Field(sa_type=BigInteger)
    hosted_invoice_url: str | None = Field(default=None, sa_type=Text)
    invoice_pdf: str | None = Field(default=None, sa_type=Text)
    period_start: datetime | None = Field(default=None, sa_type=UTCDateTime)
    period_end: datetime | None = Field(default=None, sa_type=UTCDateTime)
    created: datetime = Field(sa_type=UTCDateTime)
    synced_at: datetime = Field(sa_type=UTCDateTime)
    # Revenue metrics (migration 0010): payment attempts so far, when it was finalized (its
    # first charge) and paid, the metered lines' amount and the discounts, both in cents.
    attempt_count: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    finalized_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    paid_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    metered_amount: int = Field(default=0, sa_type=BigInteger, sa_column_kwargs={"server_default": "0"})
    discount_amount: int = Field(default=0, sa_type=BigInteger, sa_column_kwargs={"server_default": "0"})


class RateLimit(SQLModel, table=True):
    """Request budgets (billing/rate_limit.py): one row per key, its window and the hits in it."""

    __tablename__ = "rate_limit"
    __table_args__ = (CheckConstraint("hits > 0", name="hits_positive"),)

    bucket: str = Field(primary_key=True, sa_type=String(320))
    window_start: datetime = Field(sa_type=UTCDateTime)
    hits: int = Field(sa_type=Integer)


class HostEventStatus(StrEnum):
    """Life of an event for the host app (`host_event`, billing/host_events/)."""

    PENDING = "pending"  # waiting for its (next) delivery attempt
    SENDING = "sending"  # claimed by a delivery worker until `lease_expires_at`
    DELIVERED = "delivered"  # the host answered 2xx
    FAILED = "failed"  # every attempt of the retry schedule failed: `billing host-events replay`


class HostEvent(SQLModel, table=True):
    """The outbox of events for the host app, written in the same transaction as their cause.

    `id` orders an account's events; `message_id` is the Standard Webhooks `webhook-id`, the same
    on every attempt; `dedupe_key` (NULL for state changes) makes a Stripe event seen twice add
    no second event.
    """

    __tablename__ = "host_event"
    __table_args__ = (
        UniqueConstraint("message_id"),
        UniqueConstraint("dedupe_key"),
        CheckConstraint(f"status IN ({sql_in(HostEventStatus)})", name="status"),
        Index(None, "status", "next_attempt_at"),
        Index(None, "account_id", "id"),
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=BigId)
    message_id: str = Field(sa_type=String(64))
    type: str = Field(sa_type=String(64))
    account_id: int | None = Field(default=None, sa_type=BigId)
    user_id: str | None = Field(default=None, sa_type=String(255))
    dedupe_key: str | None = Field(default=None, sa_type=String(320))
    payload: dict[str, Any] = Field(sa_type=Json)  # the document sent: type, timestamp, data
    created_at: datetime = Field(sa_type=UTCDateTime)
    status: str = Field(default=HostEventStatus.PENDING.value, sa_type=String(16))
    attempts: int = Field(default=0)
    next_attempt_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    lease_expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    last_error: str | None = Field(default=None, sa_type=Text)
    last_status_code: int | None = Field(default=None)
    delivered_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class HostEventAttempt(SQLModel, table=True):
    """One delivery attempt of a host event (append-only): its answer and latency."""

    __tablename__ = "host_event_attempt"
    __table_args__ = (Index(None, "event_id", "id"),)

    id: int | None = Field(default=None, primary_key=True, sa_type=BigId)
    event_id: int = Field(foreign_key="host_event.id", ondelete="CASCADE", sa_type=BigId)
    attempt: int = Field()
    url: str = Field(sa_type=Text)
    attempted_at: datetime = Field(sa_type=UTCDateTime)
    status_code: int | None = Field(default=None)  # None: no answer (connection error, timeout)
    latency_ms: int = Field()
    error: str | None = Field(default=None, sa_type=Text)


class HostEndpoint(SQLModel, table=True):
    """The host's webhook endpoint, by URL: disabled after a `410 Gone` until a replay."""

    __tablename__ = "host_endpoint"

    url: str = Field(primary_key=True, sa_type=String(2048))
    disabled_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    disabled_reason: str | None = Field(default=None, sa_type=Text)
    updated_at: datetime = Field(sa_type=UTCDateTime)


class BillingLedgerEntry(SQLModel, table=True):
    """The history of an account's billing state, append-only (billing/ledger.py).

    One row per change, written by the sync in the transaction of the change: the tracked
    fields before (NULL for an account's first row) and after, when the change happened at
    Stripe (`effective_at`), and its causes. Triggers refuse UPDATE and DELETE (migration 0008).
    """

    __tablename__ = "billing_ledger"
    __table_args__ = (
        CheckConstraint("kind IN ('initial', 'change')", name="kind"),
        Index(None, "account_id", "id"),
        Index(None, "effective_at"),
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=BigId)
    account_id: int = Field(sa_type=BigId)
    user_id: str = Field(sa_type=String(255))
    stripe_customer_id: str | None = Field(default=None, sa_type=String(255))
    kind: str = Field(sa_type=String(16))  # initial: the backfill of an existing account
    changed: list[str] = Field(sa_type=Json)  # the tracked fields that changed
    before: dict[str, Any] | None = Field(default=None, sa_type=Json)
    after: dict[str, Any] = Field(sa_type=Json)
    causes: list[dict[str, Any]] = Field(sa_type=Json)  # [{"type", "id"?}]: events, mutation, ...
    effective_at: datetime = Field(sa_type=UTCDateTime)
    recorded_at: datetime = Field(sa_type=UTCDateTime)


account_table = BillingAccount.__table__  # type: ignore[attr-defined]
usage_table = UsageRecord.__table__  # type: ignore[attr-defined]
rollup_table = UsageRollup.__table__  # type: ignore[attr-defined]
report_table = UsageReport.__table__  # type: ignore[attr-defined]
event_table = StripeEvent.__table__  # type: ignore[attr-defined]
invoice_table = Invoice.__table__  # type: ignore[attr-defined]
quote_table = PlanChangeQuote.__table__  # type: ignore[attr-defined]
rate_limit_table = RateLimit.__table__  # type: ignore[attr-defined]
host_event_table = HostEvent.__table__  # type: ignore[attr-defined]
host_attempt_table = HostEventAttempt.__table__  # type: ignore[attr-defined]
host_endpoint_table = HostEndpoint.__table__  # type: ignore[attr-defined]
ledger_table = BillingLedgerEntry.__table__  # type: ignore[attr-defined]
usage_total_table = UsageWindowTotal.__table__  # type: ignore[attr-defined]
