"""`viewer` and `access(feature)` over HTTP for accounts in every Stripe status, read from the database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from db.engine import Database
from tests.graphql_support import SERVICE_KEY, error_codes, hs256_token, insert_account, serve_api

VIEWER = """{
  viewer {
    id email name
    subscription {
      status tier effectiveTier hasAccess interval priceId
      currentPeriodStart currentPeriodEnd trialEnd cancelAtPeriodEnd canceledAt trialUsed
    }
  }
}"""
ACCESS = """query($f: String!) { access(feature: $f) { allowed reason effectiveTier requiredTier } }"""


def iso(value: datetime) -> str:
    return value.isoformat()


async def test_a_user_without_an_account_has_no_subscription(database: Database) -> None:
    async with serve_api(database) as api:
        result = await api.query(VIEWER, token=hs256_token("newcomer", email="new@example.test"))
    assert result == {
        "data": {
            "viewer": {
                "id": "newcomer",
                "email": "new@example.test",
                "name": None,
                "subscription": {
                    "status": "NONE",
                    "tier": "NONE",
                    "effectiveTier": "NONE",
                    "hasAccess": False,
                    "interval": None,
                    "priceId": None,
                    "currentPeriodStart": None,
                    "currentPeriodEnd": None,
                    "trialEnd": None,
                    "cancelAtPeriodEnd": False,
                    "canceledAt": None,
                    "trialUsed": False,
                },
            }
        }
    }


async def test_the_viewer_reads_every_field_from_the_row(database: Database) -> None:
    start = datetime(2026, 1, 5, 9, 30, tzinfo=UTC)
    now = datetime.now(UTC)
    trial_end = now + timedelta(days=10)
    await insert_account(
        database,
        "trialer",
        status="trialing",
        tier="pro",
        interval="annual",
        period_start=start,
        current_period_end=start + timedelta(days=365),
        trial_end=trial_end,
        cancel_at_period_end=True,
        name="Tria Ler",
    )
    async with serve_api(database) as api:
        result = await api.query(VIEWER, token=hs256_token("trialer"))
    assert result["data"]["viewer"] == {
        "id": "trialer",
        "email": "trialer@example.test",  # no email claim: the stored one
        "name": "Tria Ler",
        "subscription": {
            "status": "TRIALING",
            "tier": "PRO",
            "effectiveTier": "PRO",
            "hasAccess": True,
            "interval": "ANNUAL",
            "priceId": "price_pro_annual",
            "currentPeriodStart": iso(start),
            "currentPeriodEnd": iso(start + timedelta(days=365)),
            "trialEnd": iso(trial_end),
            "cancelAtPeriodEnd": True,
            "canceledAt": None,
            "trialUsed": True,
        },
    }


# status, days since current_period_start, effective tier, hasAccess
STATUSES = [
    ("active", 3, "PRO", True),
    ("trialing", 3, "PRO", True),
    ("past_due", 2, "PRO", True),  # inside the 7-day grace period
    ("past_due", 8, "NONE", False),  # outside it
    ("canceled", 3, "NONE", False),
    ("unpaid", 3, "NONE", False),
    ("incomplete", 0, "NONE", False),
    ("incomplete_expired", 2, "NONE", False),
    ("paused", 3, "NONE", False),
]


@pytest.mark.parametrize(("status", "days", "effective", "has_access"), STATUSES)
async def test_has_access_follows_the_status(
    database: Database, status: str, days: int, effective: str, has_access: bool
) -> None:
    start = datetime.now(UTC) - timedelta(days=days)
    canceled_at = start if status == "canceled" else None
    await insert_account(
        database, "pro-user", status=status, tier="pro", period_start=start, canceled_at=canceled_at
    )
    async with serve_api(database) as api:
        token = hs256_token("pro-user")
        viewer = await api.query(VIEWER, token=token)
        advanced = await api.query(ACCESS, {"f": "advanced_analytics"}, token=token)
        basic = await api.query(ACCESS, {"f": "basic_analytics"}, token=token)
    subscription = viewer["data"]["viewer"]["subscription"]
    assert subscription["status"] == status.upper()
    assert subscription["tier"] == "PRO"  # what they pay for, whatever the status
    assert subscription["effectiveTier"] == effective
    assert subscription["hasAccess"] is has_access
    if canceled_at is not None:
        assert subscription["canceledAt"] == iso(canceled_at)
    for decision in (advanced["data"]["access"], basic["data"]["access"]):
        assert decision["allowed"] is has_access
        assert decision["effectiveTier"] == effective
        assert decision["reason"] == (None if has_access else "SUBSCRIPTION_INACTIVE")
    assert advanced["data"]["access"]["requiredTier"] == "PRO"
    assert basic["data"]["access"]["requiredTier"] == "STARTER"


async def test_the_grace_period_setting_changes_past_due_access(database: Database) -> None:
    await insert_account(
        database,
        "late",
        status="past_due",
        tier="starter",
        period_start=datetime.now(UTC) - timedelta(days=2),
    )
    async with serve_api(database, past_due_grace_days=1) as api:
        short = await api.query(ACCESS, {"f": "api_access"}, token=hs256_token("late"))
    async with serve_api(database, past_due_grace_days=3) as api:
        long = await api.query(ACCESS, {"f": "api_access"}, token=hs256_token("late"))
    assert short["data"]["access"] == {
        "allowed": False,
        "reason": "SUBSCRIPTION_INACTIVE",
        "effectiveTier": "NONE",
        "requiredTier": "STARTER",
    }
    assert long["data"]["access"]["allowed"] is True


@pytest.mark.parametrize(
    ("feature", "account", "expected"),
    [
        ("api_access", None, {"allowed": False, "reason": "NO_SUBSCRIPTION", "effectiveTier": "NONE"}),
        ("api_access", "starter", {"allowed": True, "reason": None, "effectiveTier": "STARTER"}),
        ("storage_gb", "starter", {"allowed": True, "reason": None, "effectiveTier": "STARTER"}),
        (
            "priority_support",
            "starter",
            {"allowed": False, "reason": "FEATURE_NOT_IN_PLAN", "effectiveTier": "STARTER"},
        ),
        ("priority_support", "pro", {"allowed": True, "reason": None, "effectiveTier": "PRO"}),
        ("time_travel", "pro", {"allowed": False, "reason": "UNKNOWN_FEATURE", "effectiveTier": "PRO"}),
        ("time_travel", None, {"allowed": False, "reason": "UNKNOWN_FEATURE", "effectiveTier": "NONE"}),
    ],
)
async def test_access_reasons(
    database: Database, feature: str, account: str | None, expected: dict[str, Any]
) -> None:
    if account is not None:
        await insert_account(database, "asker", status="active", tier=account)
    async with serve_api(database) as api:
        result = await api.query(ACCESS, {"f": feature}, token=hs256_token("asker"))
    decision = result["data"]["access"]
    assert {key: decision[key] for key in expected} == expected


async def test_an_account_row_with_status_none_is_no_subscription(database: Database) -> None:
    await insert_account(database, "customer-only", status="none", tier="none", interval=None)
    async with serve_api(database) as api:
        result = await api.query(ACCESS, {"f": "api_access"}, token=hs256_token("customer-only"))
    assert result["data"]["access"]["reason"] == "NO_SUBSCRIPTION"


async def test_access_without_a_token_and_with_the_service_key(database: Database) -> None:
    async with serve_api(database, service_api_key=SERVICE_KEY) as api:
        anonymous = await api.query(ACCESS, {"f": "advanced_analytics"})
        unknown = await api.query(ACCESS, {"f": "time_travel"})
        service = await api.query(ACCESS, {"f": "advanced_analytics"}, token=SERVICE_KEY)
    assert anonymous["data"]["access"] == {
        "allowed": False,
        "reason": "UNAUTHENTICATED",
        "effectiveTier": "NONE",
        "requiredTier": "PRO",
    }
    assert unknown["data"]["access"]["reason"] == "UNKNOWN_FEATURE"
    assert error_codes(service) == ["FORBIDDEN"]  # the service has no subscription of its own


async def test_user_subscription_for_the_service(database: Database) -> None:
    start = datetime.now(UTC) - timedelta(days=10)
    await insert_account(database, "dunned", status="past_due", tier="pro", period_start=start)
    query = """query($u: ID!) { userSubscription(userId: $u) { status tier effectiveTier hasAccess } }"""
    async with serve_api(database, service_api_key=SERVICE_KEY) as api:
        dunned = await api.query(query, {"u": "dunned"}, token=SERVICE_KEY)
        stranger = await api.query(query, {"u": "stranger"}, token=SERVICE_KEY)
    assert dunned["data"]["userSubscription"] == {
        "status": "PAST_DUE",
        "tier": "PRO",
        "effectiveTier": "NONE",
        "hasAccess": False,
    }
    assert stranger["data"]["userSubscription"] == {
        "status": "NONE",
        "tier": "NONE",
        "effectiveTier": "NONE",
        "hasAccess": False,
    }
