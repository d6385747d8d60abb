"""Value sets stored in the tables. `billing` gives them their meaning."""

from __future__ import annotations

from enum import StrEnum


class Tier(StrEnum):
    NONE = "none"
    STARTER = "starter"
    PRO = "pro"


class BillingInterval(StrEnum):
    MONTHLY = "monthly"
    ANNUAL = "annual"


class SubscriptionStatus(StrEnum):
    """Every status Stripe documents for a subscription, plus `none` (never subscribed)."""

    NONE = "none"
    INCOMPLETE = "incomplete"
    INCOMPLETE_EXPIRED = "incomplete_expired"
    TRIALING = "trialing"
    ACTIVE = "active"
    PAST_DUE = "past_due"
    CANCELED = "canceled"
    UNPAID = "unpaid"
    PAUSED = "paused"


class EventStatus(StrEnum):
    """Life of a Stripe event in the inbox."""

    PENDING = "pending"
    PROCESSING = "processing"
    PROCESSED = "processed"
    IGNORED = "ignored"
    FAILED = "failed"


def sql_in(enum: type[StrEnum]) -> str:
    """The body of a CHECK constraint allowing exactly the enum's values."""
    return ", ".join(f"'{member.value}'" for member in enum)
