"""Who may use what: the effective tier of a subscription, and access decisions built on it.

`effective_tier` is the one place that decides whether a subscription grants access. Everything
else (`hasAccess`, `access(feature)`, the permission classes of the GraphQL layer) asks it:

- `active` and `trialing` grant the subscription's tier;
- `past_due` grants it during a grace period (`PAST_DUE_GRACE_DAYS`, default 7) measured from
  `current_period_start`: when a renewal fails Stripe has already moved the period forward, so
  the start of the current period is when the unpaid renewal began. On an annual plan it is
  measured from the start of the current month counted from the period start: the plan's
  monthly metered items are invoiced there, and a failed usage invoice makes the whole
  subscription `past_due`;
- every other status (`none`, `incomplete`, `incomplete_expired`, `canceled`, `unpaid`,
  `paused`) grants nothing: a canceled or unpaid Pro subscriber is `NONE`.

Subscription state is read from the database (one query by user id), never from Stripe.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import ColumnElement, Select, bindparam, select
from sqlalchemy.ext.asyncio import AsyncConnection

from billing.errors import BillingError, ErrorCode
from billing.plans import Catalog, tier_rank
from billing.settings import Settings
from db.engine import Database
from db.enums import BillingInterval, SubscriptionStatus, Tier
from db.models import account_table

GRANTING_STATUSES = frozenset({SubscriptionStatus.ACTIVE, SubscriptionStatus.TRIALING})
FEATURE_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
MAX_USER_ID_LENGTH = 255
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


class AccessReason(StrEnum):
    """Why access is refused (an allowed decision has no reason)."""

    UNAUTHENTICATED = "UNAUTHENTICATED"  # nobody is signed in
    NO_SUBSCRIPTION = "NO_SUBSCRIPTION"  # never subscribed
    SUBSCRIPTION_INACTIVE = "SUBSCRIPTION_INACTIVE"  # subscribed, but the status grants nothing now
    TIER_TOO_LOW = "TIER_TOO_LOW"  # access, but to a lower tier than required
    FEATURE_NOT_IN_PLAN = "FEATURE_NOT_IN_PLAN"  # access, but the plan lacks the feature
    UNKNOWN_FEATURE = "UNKNOWN_FEATURE"  # no plan has this feature
    QUOTA_EXCEEDED = "QUOTA_EXCEEDED"  # the plan has the feature, and this window's usage reached its limit


@dataclass(frozen=True, slots=True)
class SubscriptionState:
    """What the database knows about one user's subscription (status `none` without a row)."""

    user_id: str
    email: str | None = None
    name: str | None = None
    status: SubscriptionStatus = SubscriptionStatus.NONE
    tier: Tier = Tier.NONE
    interval: BillingInterval | None = None
    price_id: str | None = None
    current_period_start: datetime | None = None
    current_period_end: datetime | None = None
    trial_end: datetime | None = None
    cancel_at_period_end: bool = False
    canceled_at: datetime | None = None
    trial_used: bool = False
    account_id: int | None = None  # the `billing_account` row; None when the user has none
    # A plan change scheduled for the period end (a downgrade), or None.
    pending_tier: Tier | None = None
    pending_interval: BillingInterval | None = None
    pending_change_at: datetime | None = None
    seats: int | None = None  # the subscription's licensed quantity (an organisation's seat count)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> SubscriptionState:
        """The state of a row of `account_state_select`."""
        pending_tier, pending_interval = row["pending_tier"], row["pending_interval"]
        return cls(
            user_id=row["user_id"],
            email=row["email"],
            name=row["name"],
            status=SubscriptionStatus(row["status"]),
            tier=Tier(row["tier"]),
            interval=BillingInterval(row["interval"]) if row["interval"] else None,
            price_id=row["stripe_price_id"],
            current_period_start=row["current_period_start"],
            current_period_end=row["current_period_end"],
            trial_end=row["trial_end"],
            cancel_at_period_end=bool(row["cancel_at_period_end"]),
            canceled_at=row["canceled_at"],
            trial_used=bool(row["trial_used"]),
            account_id=int(row["id"]),
            pending_tier=Tier(pending_tier) if pending_tier else None,
            pending_interval=BillingInterval(pending_interval) if pending_interval else None,
            pending_change_at=row["pending_change_at"],
            seats=row["seats"],
        )


_c = account_table.c
_STATE_COLUMNS = (
    _c.id,
    _c.user_id,
    _c.email,
    _c.name,
    _c.status,
    _c.tier,
    _c.interval,
    _c.stripe_price_id,
    _c.current_period_start,
    _c.current_period_end,
    _c.trial_end,
    _c.cancel_at_period_end,
    _c.canceled_at,
    _c.trial_used,
    _c.pending_tier,
    _c.pending_interval,
    _c.pending_change_at,
    _c.seats,
)


def account_state_select(condition: ColumnElement[bool]) -> Select[Any]:
    """The account-state rows matching `condition`: the one column list `SubscriptionState.from_row` reads."""
    return select(*_STATE_COLUMNS).where(condition)


_BY_USER = account_state_select(_c.user_id == bindparam("user_id"))


async def load_subscription(database: Database, user_id: str) -> SubscriptionState:
    """The user's subscription state in one query; status `none` when they have no account."""
    row = await database.first(_BY_USER, {"user_id": user_id})
    return SubscriptionState(user_id=user_id) if row is None else SubscriptionState.from_row(row)


async def account_states(conn: AsyncConnection, user_ids: Sequence[str]) -> dict[str, SubscriptionState]:
    """The state of each of `user_ids` that has an account, in one query (users without one are left out)."""
    rows = await conn.execute(account_state_select(_c.user_id.in_(user_ids)))
    return {row["user_id"]: SubscriptionState.from_row(row) for row in rows.mappings()}


def add_months(anchor: datetime, months: int) -> datetime:
    """`anchor` moved by whole months, keeping its day (clamped to the month's last) and time."""
    years, month_index = divmod(anchor.month - 1 + months, 12)
    year, month = anchor.year + years, month_index + 1
    return anchor.replace(year=year, month=month, day=min(anchor.day, calendar.monthrange(year, month)[1]))


def months_since(anchor: datetime, now: datetime) -> int:
    """Whole months counted from `anchor` up to `now` (negative before it)."""
    months = (now.year - anchor.year) * 12 + (now.month - anchor.month)
    while add_months(anchor, months) > now:
        months -= 1
    while add_months(anchor, months + 1) <= now:
        months += 1
    return months


def unpaid_since(start: datetime, interval: BillingInterval | None, now: datetime) -> datetime:
    """When the unpaid invoice of a `past_due` subscription whose period started at `start` was
    made: that start (a failed renewal has moved the period on), or on an annual plan the start
    of the current month counted from it (its monthly metered items are invoiced there)."""
    if interval is BillingInterval.ANNUAL and now >= start:
        return add_months(start, months_since(start, now))
    return start


def effective_tier(state: SubscriptionState, *, now: datetime, past_due_grace: timedelta) -> Tier:
    """The tier the user may use right now. The only function that decides access."""
    if state.status in GRANTING_STATUSES:
        return state.tier
    if (
        state.status is SubscriptionStatus.PAST_DUE
        and state.current_period_start is not None
        and now < unpaid_since(state.current_period_start, state.interval, now) + past_due_grace
    ):
        return state.tier
    return Tier.NONE


@dataclass(frozen=True, slots=True)
class AccessDecision:
    allowed: bool
    reason: AccessReason | None
    effective_tier: Tier
    required_tier: Tier | None  # the lowest tier that would be allowed; None for an unknown feature

    def error(self, code: ErrorCode, message: str) -> BillingError:
        """The error a permission raises when this decision refuses."""
        extensions: dict[str, Any] = {"reason": self.reason.value if self.reason else None}
        extensions["effectiveTier"] = self.effective_tier.name
        if self.required_tier is not None:
            extensions["requiredTier"] = self.required_tier.name
        return BillingError(message, code=code, **extensions)


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    """The catalog and the grace period: everything an access decision needs besides the state."""

    catalog: Catalog
    past_due_grace: timedelta

    @classmethod
    def from_settings(cls, catalog: Catalog, settings: Settings) -> AccessPolicy:
        return cls(catalog=catalog, past_due_grace=timedelta(days=settings.past_due_grace_days))

    def effective_tier(self, state: SubscriptionState, now: datetime) -> Tier:
        return effective_tier(state, now=now, past_due_grace=self.past_due_grace)

    def has_access(self, state: SubscriptionState, now: datetime) -> bool:
        return self.effective_tier(state, now) is not Tier.NONE

    def lowest_tier_with(self, feature: str) -> Tier | None:
        tiers = [tier for tier, plan in self.catalog.plans.items() if feature in plan.features]
        return min(tiers, key=tier_rank) if tiers else None

    def tier_access(self, state: SubscriptionState, required: Tier, now: datetime) -> AccessDecision:
        """May the user use what `required` (or any higher tier) offers? NONE means any paid tier."""
        required = required if required is not Tier.NONE else _lowest_paid_tier()
        tier = self.effective_tier(state, now)
        if tier is Tier.NONE:
            return AccessDecision(False, _inactive_reason(state), tier, required)
        if tier_rank(tier) < tier_rank(required):
            return AccessDecision(False, AccessReason.TIER_TOO_LOW, tier, required)
        return AccessDecision(True, None, tier, required)

    def feature_access(self, state: SubscriptionState, feature: str, now: datetime) -> AccessDecision:
        """May the user use `feature`? Unknown features are reported before anything else."""
        check_feature_name(feature)
        tier = self.effective_tier(state, now)
        required = self.lowest_tier_with(feature)
        if required is None:
            return AccessDecision(False, AccessReason.UNKNOWN_FEATURE, tier, None)
        if tier is Tier.NONE:
            return AccessDecision(False, _inactive_reason(state), tier, required)
        if not self.catalog.has_feature(tier, feature):
            return AccessDecision(False, AccessReason.FEATURE_NOT_IN_PLAN, tier, required)
        return AccessDecision(True, None, tier, required)

    def quota_access(self, decision: AccessDecision, feature: str, used: int) -> AccessDecision:
        """The quota check: an allowed decision becomes QUOTA_EXCEEDED once `used` reached the limit.

        `used` is the current quota window's usage (`billing.usage` reads it). The limit is the
        effective tier's monthly limit; a feature without one is never over quota. Exactly at
        the limit access is refused: the limit is the number of uses the window allows.
        """
        if not decision.allowed:
            return decision
        limit = self.catalog.limit(decision.effective_tier, feature)
        if limit is not None and used >= limit:
            return AccessDecision(
                False, AccessReason.QUOTA_EXCEEDED, decision.effective_tier, decision.required_tier
            )
        return decision

    def anonymous_feature_access(self, feature: str) -> AccessDecision:
        """The decision for a visitor who is not signed in."""
        check_feature_name(feature)
        required = self.lowest_tier_with(feature)
        reason = AccessReason.UNKNOWN_FEATURE if required is None else AccessReason.UNAUTHENTICATED
        return AccessDecision(False, reason, Tier.NONE, required)


def check_feature_name(feature: str) -> None:
    if not FEATURE_NAME.fullmatch(feature):
        raise BillingError(
            "feature must be 1 to 64 letters, digits or _ . : -",
            code=ErrorCode.BAD_USER_INPUT,
            field="feature",
        )


def is_plain_text(value: str) -> bool:
    """No control characters (NUL, newlines, ...): PostgreSQL cannot even store a NUL."""
    return CONTROL_CHARACTERS.search(value) is None


def is_user_id(value: str) -> bool:
    """A user id as identity providers issue them: 1 to 255 characters, no control characters."""
    return 0 < len(value) <= MAX_USER_ID_LENGTH and is_plain_text(value)


def check_user_id(user_id: str) -> None:
    if not is_user_id(user_id):
        raise BillingError(
            f"userId must be 1 to {MAX_USER_ID_LENGTH} characters, none of them control characters",
            code=ErrorCode.BAD_USER_INPUT,
            field="userId",
        )


def _lowest_paid_tier() -> Tier:
    return min((tier for tier in Tier if tier is not Tier.NONE), key=tier_rank)


def _inactive_reason(state: SubscriptionState) -> AccessReason:
    if state.status is SubscriptionStatus.NONE:
        return AccessReason.NO_SUBSCRIPTION
    return AccessReason.SUBSCRIPTION_INACTIVE
