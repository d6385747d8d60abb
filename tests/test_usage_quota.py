"""Quota enforcement through the example host app's metered field, at and past the limit."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from billing.plans import load_catalog
from billing.usage import UsageInput, record_usage
from db.engine import Database
from db.enums import Tier
from examples.host_app import create_host_app
from tests.conftest import free_port, serve
from tests.graphql_support import SERVICE_KEY, Api, hs256_token, insert_account, settings_for

CATALOG = load_catalog()
LIMIT = CATALOG.limit(Tier.STARTER, "api_calls")
PRO_LIMIT = CATALOG.limit(Tier.PRO, "api_calls")
assert LIMIT is not None and PRO_LIMIT is not None and PRO_LIMIT > LIMIT
LOOKUP = '{ lookup(query: "abc") { answer } }'
STATUS = """{
  access(feature: "api_calls") { allowed reason effectiveTier }
  viewer { usage(feature: "api_calls") { used limit remaining } }
}"""


@pytest.fixture
async def host(database: Database) -> AsyncIterator[Api]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    app = create_host_app(
        settings_for(url, service_api_key=SERVICE_KEY, usage_reporter=False), database=database
    )
    async with serve(app, port):
        yield Api(url=url, app=app)


async def use(database: Database, user: str, quantity: int, key: str) -> None:
    await record_usage(
        database=database, catalog=CATALOG, records=[UsageInput(user, "api_calls", quantity, key)]
    )


async def status(host: Api, user: str) -> dict[str, Any]:
    result = await host.query(STATUS, token=hs256_token(user))
    assert "errors" not in result, result
    data: dict[str, Any] = result["data"]
    return data


async def test_the_last_call_under_the_limit_passes_and_the_next_is_refused(
    database: Database, host: Api
) -> None:
    await insert_account(database, "member", tier="starter")
    await use(database, "member", LIMIT - 1, "bulk")

    last = await host.query(LOOKUP, token=hs256_token("member"))
    assert last == {"data": {"lookup": {"answer": "cba"}}}
    at_limit = await status(host, "member")
    assert at_limit["viewer"]["usage"] == {"used": LIMIT, "limit": LIMIT, "remaining": 0}
    assert at_limit["access"] == {"allowed": False, "reason": "QUOTA_EXCEEDED", "effectiveTier": "STARTER"}

    refused = await host.query(LOOKUP, token=hs256_token("member"))
    assert refused["data"] == {"lookup": None}
    (error,) = refused["errors"]
    extensions = error["extensions"]
    assert extensions["code"] == "QUOTA_EXCEEDED" and extensions["reason"] == "QUOTA_EXCEEDED"
    assert (extensions["limit"], extensions["used"], extensions["feature"]) == (LIMIT, LIMIT, "api_calls")
    assert extensions["effectiveTier"] == "STARTER" and "resetsAt" in extensions
    assert (await status(host, "member"))["viewer"]["usage"]["used"] == LIMIT  # a refusal records nothing


async def test_past_the_limit_stays_refused_and_shows_no_negative_remaining(
    database: Database, host: Api
) -> None:
    await insert_account(database, "member", tier="starter")
    await use(database, "member", LIMIT + 250, "over")  # recording never refuses: the use happened

    refused = await host.query(LOOKUP, token=hs256_token("member"))
    assert refused["errors"][0]["extensions"]["code"] == "QUOTA_EXCEEDED"
    assert refused["errors"][0]["extensions"]["used"] == LIMIT + 250
    current = await status(host, "member")
    assert current["viewer"]["usage"] == {"used": LIMIT + 250, "limit": LIMIT, "remaining": 0}


async def test_the_limit_follows_the_tier(database: Database, host: Api) -> None:
    await insert_account(database, "starter", tier="starter")
    await insert_account(database, "pro", tier="pro")
    await use(database, "starter", LIMIT, "s")
    await use(database, "pro", LIMIT, "p")

    starter = await host.query(LOOKUP, token=hs256_token("starter"))
    pro = await host.query(LOOKUP, token=hs256_token("pro"))
    assert starter["errors"][0]["extensions"]["code"] == "QUOTA_EXCEEDED"
    assert pro["data"]["lookup"] == {"answer": "cba"}
    assert (await status(host, "pro"))["viewer"]["usage"]["remaining"] == PRO_LIMIT - LIMIT - 1


async def test_a_retried_request_is_counted_once(database: Database, host: Api) -> None:
    await insert_account(database, "member", tier="starter")
    for _ in range(3):
        answer = await host.query(LOOKUP, token=hs256_token("member"), headers={"X-Request-ID": "req-42"})
        assert answer["data"]["lookup"] == {"answer": "cba"}
    assert (await status(host, "member"))["viewer"]["usage"]["used"] == 1


async def test_without_a_subscription_the_field_is_not_in_the_plan(database: Database, host: Api) -> None:
    await insert_account(database, "lapsed", status="canceled", tier="starter")
    for user in ("lapsed", "visitor"):
        result = await host.query(LOOKUP, token=hs256_token(user))
        extensions = result["errors"][0]["extensions"]
        assert extensions["code"] == "FEATURE_NOT_IN_PLAN"
        assert extensions["reason"] in {"SUBSCRIPTION_INACTIVE", "NO_SUBSCRIPTION"}
    service = await host.query(LOOKUP, token=SERVICE_KEY)
    assert service["errors"][0]["extensions"]["code"] == "FORBIDDEN"


async def test_concurrent_calls_just_under_the_limit_overshoot_by_at_most_the_calls_in_flight(
    database: Database, host: Api
) -> None:
    """The documented bound: usage ends at most at limit - 1 + (calls admitted concurrently)."""
    await insert_account(database, "member", tier="starter")
    await use(database, "member", LIMIT - 1, "bulk")
    in_flight = 8

    results = await asyncio.gather(
        *(host.query(LOOKUP, token=hs256_token("member")) for _ in range(in_flight))
    )

    answered = sum(1 for result in results if result["data"]["lookup"] is not None)
    refused = [result for result in results if result["data"]["lookup"] is None]
    assert answered >= 1
    assert all(r["errors"][0]["extensions"]["code"] == "QUOTA_EXCEEDED" for r in refused)
    used = (await status(host, "member"))["viewer"]["usage"]["used"]
    assert used == LIMIT - 1 + answered  # every admitted call counted exactly once
    assert used <= LIMIT - 1 + in_flight
    after = await host.query(LOOKUP, token=hs256_token("member"))
    assert after["errors"][0]["extensions"]["code"] == "QUOTA_EXCEEDED"
