"""The effective tier: one function decides which statuses grant access, and for how long past_due does."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from billing.access import (
    AccessPolicy,
    AccessReason,
    SubscriptionState,
    account_states,
    effective_tier,
    load_subscription,
)
from billing.errors import BillingError, ErrorCode
from billing.plans import load_catalog
from billing.settings import Settings
from db.engine import Database
from db.enums import BillingInterval, SubscriptionStatus, Tier
from tests.graphql_support import insert_account

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
GRACE = timedelta(days=7)
CATALOG = load_catalog()
POLICY = AccessPolicy(CATALOG, GRACE)

GRANTING = {SubscriptionStatus.ACTIVE, SubscriptionStatus.TRIALING}
NEVER_GRANTING = set(SubscriptionStatus) - GRANTING - {SubscriptionStatus.PAST_DUE}


def state(
    status: SubscriptionStatus, tier: Tier = Tier.PRO, *, started_days_ago: float = 2
) -> SubscriptionState:
    return SubscriptionState(
        user_id="u",
        status=status,
        tier=tier,
        interval=BillingInterval.MONTHLY,
        current_period_start=NOW - timedelta(days=started_days_ago),
        current_period_end=NOW + timedelta(days=28),
    )


@pytest.mark.parametrize("status", sorted(GRANTING))
@pytest.mark.parametrize("tier", [Tier.STARTER, Tier.PRO])
def test_active_and_trialing_grant_their_tier(status: SubscriptionStatus, tier: Tier) -> None:
    assert effective_tier(state(status, tier), now=NOW, past_due_grace=GRACE) is tier


@pytest.mark.parametrize("status", sorted(NEVER_GRANTING))
def test_every_other_status_is_none_even_for_pro(status: SubscriptionStatus) -> None:
    assert effective_tier(state(status, Tier.PRO), now=NOW, past_due_grace=GRACE) is Tier.NONE


def test_past_due_keeps_the_tier_during_the_grace_period_from_the_period_start() -> None:
    assert (
        effective_tier(state(SubscriptionStatus.PAST_DUE, started_days_ago=0), now=NOW, past_due_grace=GRACE)
        is Tier.PRO
    )
    assert (
        effective_tier(
            state(SubscriptionStatus.PAST_DUE, started_days_ago=6.9), now=NOW, past_due_grace=GRACE
        )
        is Tier.PRO
    )
    # The boundary: exactly 7 days after the renewal failed, access ends.
    assert (
        effective_tier(state(SubscriptionStatus.PAST_DUE, started_days_ago=7), now=NOW, past_due_grace=GRACE)
        is Tier.NONE
    )
    assert (
        effective_tier(state(SubscriptionStatus.PAST_DUE, started_days_ago=20), now=NOW, past_due_grace=GRACE)
        is Tier.NONE
    )


def test_an_annual_plan_past_due_on_a_monthly_usage_invoice_counts_the_grace_from_that_month() -> None:
    """Monthly metered items of an annual plan are invoiced each month counted from the period
    start; a failed usage invoice makes the subscription past_due long after the year began."""

    def annual(days_into_month: float) -> SubscriptionState:
        month_started = NOW - timedelta(days=days_into_month)
        return SubscriptionState(
            user_id="u",
            status=SubscriptionStatus.PAST_DUE,
            tier=Tier.PRO,
            interval=BillingInterval.ANNUAL,
            current_period_start=month_started.replace(month=month_started.month - 2),  # 2 months before
            current_period_end=month_started.replace(
                year=month_started.year + 1, month=month_started.month - 2
            ),
        )

    assert effective_tier(annual(1), now=NOW, past_due_grace=GRACE) is Tier.PRO
    assert effective_tier(annual(6.9), now=NOW, past_due_grace=GRACE) is Tier.PRO
    assert effective_tier(annual(7), now=NOW, past_due_grace=GRACE) is Tier.NONE


def test_past_due_without_a_period_or_without_grace_is_none() -> None:
    no_period = SubscriptionState(user_id="u", status=SubscriptionStatus.PAST_DUE, tier=Tier.PRO)
    assert effective_tier(no_period, now=NOW, past_due_grace=GRACE) is Tier.NONE
    fresh = state(SubscriptionStatus.PAST_DUE, started_days_ago=0.01)
    assert effective_tier(fresh, now=NOW, past_due_grace=timedelta(0)) is Tier.NONE


def test_the_grace_period_comes_from_the_setting() -> None:
    assert Settings().past_due_grace_days == 7
    policy = AccessPolicy.from_settings(CATALOG, Settings(past_due_grace_days=2))
    assert policy.past_due_grace == timedelta(days=2)
    assert policy.effective_tier(state(SubscriptionStatus.PAST_DUE, started_days_ago=1), NOW) is Tier.PRO
    assert policy.effective_tier(state(SubscriptionStatus.PAST_DUE, started_days_ago=3), NOW) is Tier.NONE


def test_a_negative_grace_period_is_refused() -> None:
    with pytest.raises(ValueError, match="past_due_grace_days"):
        Settings(past_due_grace_days=-1)


def test_feature_decisions_follow_the_effective_tier() -> None:
    starter = POLICY.feature_access(state(SubscriptionStatus.ACTIVE, Tier.STARTER), "advanced_analytics", NOW)
    assert (starter.allowed, starter.reason, starter.required_tier) == (
        False,
        AccessReason.FEATURE_NOT_IN_PLAN,
        Tier.PRO,
    )
    pro = POLICY.feature_access(state(SubscriptionStatus.ACTIVE, Tier.PRO), "advanced_analytics", NOW)
    assert (pro.allowed, pro.reason, pro.effective_tier) == (True, None, Tier.PRO)
    canceled = POLICY.feature_access(state(SubscriptionStatus.CANCELED, Tier.PRO), "basic_analytics", NOW)
    assert (canceled.allowed, canceled.reason, canceled.effective_tier) == (
        False,
        AccessReason.SUBSCRIPTION_INACTIVE,
        Tier.NONE,
    )
    never = POLICY.feature_access(SubscriptionState(user_id="u"), "basic_analytics", NOW)
    assert (never.allowed, never.reason, never.required_tier) == (
        False,
        AccessReason.NO_SUBSCRIPTION,
        Tier.STARTER,
    )
    unknown = POLICY.feature_access(state(SubscriptionStatus.ACTIVE), "teleportation", NOW)
    assert (unknown.allowed, unknown.reason, unknown.required_tier) == (
        False,
        AccessReason.UNKNOWN_FEATURE,
        None,
    )
    limited = POLICY.feature_access(state(SubscriptionStatus.ACTIVE, Tier.STARTER), "storage_gb", NOW)
    assert limited.allowed  # a feature with a monthly limit is part of the plan


def test_tier_decisions_rank_pro_above_starter() -> None:
    pro = state(SubscriptionStatus.ACTIVE, Tier.PRO)
    starter = state(SubscriptionStatus.ACTIVE, Tier.STARTER)
    assert POLICY.tier_access(pro, Tier.STARTER, NOW).allowed
    assert POLICY.tier_access(pro, Tier.PRO, NOW).allowed
    assert POLICY.tier_access(starter, Tier.STARTER, NOW).allowed
    refused = POLICY.tier_access(starter, Tier.PRO, NOW)
    assert (refused.allowed, refused.reason) == (False, AccessReason.TIER_TOO_LOW)
    unpaid = POLICY.tier_access(state(SubscriptionStatus.UNPAID, Tier.PRO), Tier.STARTER, NOW)
    assert (unpaid.allowed, unpaid.reason) == (False, AccessReason.SUBSCRIPTION_INACTIVE)


@pytest.mark.parametrize("feature", ["", "x" * 65, "bad feature", "drop;table", "a\n"])
def test_an_invalid_feature_name_is_bad_user_input(feature: str) -> None:
    with pytest.raises(BillingError) as caught:
        POLICY.feature_access(state(SubscriptionStatus.ACTIVE), feature, NOW)
    assert caught.value.code is ErrorCode.BAD_USER_INPUT


async def test_load_subscription_reads_the_row_or_none(database: Database) -> None:
    started = datetime.now(UTC).replace(microsecond=0) - timedelta(days=1)
    await insert_account(
        database, "reader", status="past_due", tier="starter", interval="annual", period_start=started
    )
    loaded = await load_subscription(database, "reader")
    assert loaded.status is SubscriptionStatus.PAST_DUE
    assert loaded.tier is Tier.STARTER
    assert loaded.interval is BillingInterval.ANNUAL
    assert loaded.current_period_start == started
    assert loaded.email == "reader@example.test"
    assert loaded.price_id == "price_starter_annual"
    missing = await load_subscription(database, "nobody")
    assert (missing.status, missing.tier, missing.interval) == (SubscriptionStatus.NONE, Tier.NONE, None)


async def test_access_usage_and_realtime_read_one_account_state(database: Database) -> None:
    """`load_subscription` (the viewer's read), `account_states` (usage recording, realtime)
    select the same columns: the same state either way, a scheduled change included."""
    change_at = datetime.now(UTC) + timedelta(days=20)
    await insert_account(
        database, "scheduled", pending_tier="starter", pending_interval="annual", pending_change_at=change_at
    )
    await insert_account(database, "plain", status="past_due", tier="starter", interval="annual")
    async with database.read() as conn:
        many = await account_states(conn, ["scheduled", "plain", "nobody"])
    assert set(many) == {"scheduled", "plain"}
    for user_id, from_many in many.items():
        assert from_many == await load_subscription(database, user_id)
        assert from_many.account_id is not None
    scheduled = many["scheduled"]
    assert (scheduled.pending_tier, scheduled.pending_interval) == (Tier.STARTER, BillingInterval.ANNUAL)
    assert scheduled.pending_change_at == change_at
