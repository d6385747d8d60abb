"""The example host app: its own fields gated by tier and feature, for users on each tier and status."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event

from db.engine import Database
from examples.host_app import create_host_app
from tests.conftest import free_port, serve
from tests.graphql_support import SERVICE_KEY, Api, hs256_token, insert_account, settings_for

QUERY = """{
  viewer { subscription { tier status hasAccess } }
  greeting
  dashboard { projects }
  teamReport { title }
  forecast(months: 2) { revenueCents }
  cohorts { name }
}"""
GATED = ("dashboard", "teamReport", "forecast", "cohorts")
DATA = {
    "greeting": "hello",
    "dashboard": {"projects": 3},
    "teamReport": {"title": "Weekly"},
    "forecast": {"revenueCents": [10000, 20000]},
    "cohorts": [{"name": "2026-01"}],
}
# What each gated field answers: "ok", or the error code it fails with.
NOTHING = {
    "dashboard": "FORBIDDEN_TIER",
    "teamReport": "FORBIDDEN_TIER",
    "forecast": "FORBIDDEN_TIER",
    "cohorts": "FEATURE_NOT_IN_PLAN",
}
STARTER = {
    "dashboard": "ok",
    "teamReport": "ok",
    "forecast": "FORBIDDEN_TIER",
    "cohorts": "FEATURE_NOT_IN_PLAN",
}
PRO = dict.fromkeys(GATED, "ok")


@pytest.fixture
async def host(database: Database) -> AsyncIterator[Api]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    app = create_host_app(settings_for(url, service_api_key=SERVICE_KEY), database=database)
    async with serve(app, port):
        yield Api(url=url, app=app)


def outcome(result: dict[str, Any]) -> dict[str, str]:
    errors = {error["path"][0]: error for error in result.get("errors", [])}
    answers: dict[str, str] = {}
    for name in GATED:
        if name in errors:
            assert result["data"][name] is None
            answers[name] = errors[name]["extensions"]["code"]
        else:
            assert result["data"][name] == DATA[name]
            answers[name] = "ok"
    return answers


CASES = [
    # (tier, status, days since the period started, expected)
    ("starter", "active", 3, STARTER),
    ("starter", "trialing", 3, STARTER),
    ("starter", "past_due", 2, STARTER),
    ("starter", "past_due", 9, NOTHING),
    ("starter", "canceled", 3, NOTHING),
    ("pro", "active", 3, PRO),
    ("pro", "trialing", 1, PRO),
    ("pro", "past_due", 6, PRO),
    ("pro", "past_due", 8, NOTHING),
    ("pro", "canceled", 3, NOTHING),
    ("pro", "unpaid", 3, NOTHING),
    ("pro", "incomplete", 0, NOTHING),
    ("pro", "incomplete_expired", 1, NOTHING),
    ("pro", "paused", 3, NOTHING),
]


@pytest.mark.parametrize(("tier", "status", "days", "expected"), CASES)
async def test_gated_fields_by_tier_and_status(
    database: Database, host: Api, tier: str, status: str, days: int, expected: dict[str, str]
) -> None:
    start = datetime.now(UTC) - timedelta(days=days)
    await insert_account(database, "member", status=status, tier=tier, period_start=start)
    result = await host.query(QUERY, token=hs256_token("member"))
    assert outcome(result) == expected
    assert result["data"]["greeting"] == "hello"
    assert result["data"]["viewer"]["subscription"]["tier"] == tier.upper()
    assert result["data"]["viewer"]["subscription"]["hasAccess"] is (expected != NOTHING)


async def test_a_user_who_never_subscribed(host: Api) -> None:
    result = await host.query(QUERY, token=hs256_token("visitor"))
    assert outcome(result) == NOTHING
    errors = {error["path"][0]: error for error in result["errors"]}
    assert errors["forecast"]["extensions"] == {
        "code": "FORBIDDEN_TIER",
        "reason": "NO_SUBSCRIPTION",
        "effectiveTier": "NONE",
        "requiredTier": "PRO",
    }
    assert errors["cohorts"]["extensions"]["feature"] == "advanced_analytics"


async def test_refusals_explain_what_is_missing(database: Database, host: Api) -> None:
    await insert_account(database, "starter", status="active", tier="starter")
    await insert_account(database, "lapsed", status="unpaid", tier="pro")
    starter = await host.query("{ forecast { months } cohorts { name } }", token=hs256_token("starter"))
    lapsed = await host.query("{ teamReport { title } }", token=hs256_token("lapsed"))
    by_field = {error["path"][0]: error for error in starter["errors"]}
    assert by_field["forecast"]["extensions"] == {
        "code": "FORBIDDEN_TIER",
        "reason": "TIER_TOO_LOW",
        "effectiveTier": "STARTER",
        "requiredTier": "PRO",
    }
    assert "PRO" in by_field["forecast"]["message"]
    assert by_field["cohorts"]["extensions"]["reason"] == "FEATURE_NOT_IN_PLAN"
    (refused,) = lapsed["errors"]
    assert refused["extensions"]["reason"] == "SUBSCRIPTION_INACTIVE"
    assert refused["extensions"]["code"] == "FORBIDDEN_TIER"


async def test_anonymous_and_service_callers(host: Api) -> None:
    anonymous = await host.query("{ greeting dashboard { projects } forecast { months } cohorts { name } }")
    service = await host.query(
        "{ greeting dashboard { projects } forecast { months } cohorts { name } }", token=SERVICE_KEY
    )
    assert {error["extensions"]["code"] for error in anonymous["errors"]} == {"UNAUTHENTICATED"}
    assert len(anonymous["errors"]) == 4
    assert {error["extensions"]["code"] for error in service["errors"]} == {"FORBIDDEN"}
    assert len(service["errors"]) == 4


async def test_the_account_is_read_once_however_many_fields_are_gated(database: Database, host: Api) -> None:
    await insert_account(database, "member", status="active", tier="pro")
    reads: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "billing_account" in statement:
            reads.append(statement)

    event.listen(database.engine.sync_engine, "before_cursor_execute", record)
    try:
        result = await host.query(QUERY, token=hs256_token("member"))
    finally:
        event.remove(database.engine.sync_engine, "before_cursor_execute", record)
    assert outcome(result) == PRO
    assert len(reads) == 1


async def test_the_host_schema_keeps_the_billing_fields(host: Api) -> None:
    result = await host.query('{ plans { id } access(feature: "advanced_analytics") { requiredTier } }')
    assert len(result["data"]["plans"]) == 4
    assert result["data"]["access"] == {"requiredTier": "PRO"}
