"""The per-user budget of the mutations that reach Stripe, shared by every process."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import strawberry
from sqlalchemy import func, select
from strawberry.permission import BasePermission

from billing.errors import BillingError, ConfigurationError, ErrorCode
from billing.rate_limit import Rate, RateLimiter
from billing.settings import Settings, load_settings
from db.engine import Database
from db.models import rate_limit_table
from graph.permissions import PermissionExtension
from graph.rate_limit import RateLimited
from graph.schema import Query as BillingQuery
from graph.schema import build_schema, schema
from tests.graphql_support import error_codes, hs256_token, serve_api
from tests.processes import BILLING, billing_serve

STRIPE_MUTATIONS = {
    "createCheckoutSession",
    "confirmCheckoutSession",
    "createPortalSession",
    "previewPlanChange",
    "changePlan",
    "cancelSubscription",
    "resumeSubscription",
}
PORTAL = "mutation { createPortalSession { url } }"


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 27, 12, 0, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


# The rate --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "limit", "seconds"),
    [
        ("10/minute", 10, 60),
        ("100/hour", 100, 3600),
        ("5 / 30s", 5, 30),
        ("1000/day", 1000, 86400),
        ("3/seconds", 3, 1),
        ("2/min", 2, 60),
    ],
)
def test_rates_parse(text: str, limit: int, seconds: int) -> None:
    assert Rate.parse(text) == Rate(limit=limit, period=timedelta(seconds=seconds))


@pytest.mark.parametrize("text", ["10", "ten/minute", "0/minute", "10/fortnight", "10/0s", ""])
def test_bad_rates_are_refused_naming_the_setting(text: str) -> None:
    with pytest.raises(
        ConfigurationError, match=r"RATE_LIMIT_STRIPE_MUTATIONS: .* (is not a rate|at least 1)"
    ):
        load_settings(rate_limit_stripe_mutations=text)


def test_the_default_is_ten_per_minute_and_off_turns_it_off() -> None:
    assert Settings().stripe_mutations_rate == Rate(10, timedelta(minutes=1))
    assert str(Settings().stripe_mutations_rate) == "10/minute"
    assert Settings(rate_limit_stripe_mutations="off").stripe_mutations_rate is None


# The limiter, on both databases ----------------------------------------------------------------


async def test_n_hits_pass_and_the_next_is_refused_until_the_window_ends(database: Database) -> None:
    clock = Clock()
    limiter = RateLimiter(database, clock=clock)
    rate = Rate(3, timedelta(minutes=1))
    decisions = []
    for _ in range(4):
        decisions.append(await limiter.hit("user:a", rate))
        clock.now += timedelta(seconds=10)
    assert [(d.allowed, d.hits) for d in decisions] == [(True, 1), (True, 2), (True, 3), (False, 4)]
    assert decisions[-1].resets_at == datetime(2026, 11, 27, 12, 1, tzinfo=UTC)
    assert decisions[-1].retry_after(clock.now) == 20  # 12:00:40 -> 12:01:00
    with pytest.raises(BillingError) as refused:
        await limiter.check("user:a", rate, what="billing requests")
    assert refused.value.code is ErrorCode.RATE_LIMITED
    assert refused.value.extensions == {"retryAfter": 20}
    other = await limiter.hit("user:b", rate)
    assert (other.allowed, other.hits) == (True, 1)  # every key has its own budget

    clock.now = datetime(2026, 11, 27, 12, 1, 0, tzinfo=UTC)  # the window has ended
    fresh = await limiter.hit("user:a", rate)
    assert (fresh.allowed, fresh.hits, fresh.resets_at) == (
        True,
        1,
        datetime(2026, 11, 27, 12, 2, tzinfo=UTC),
    )
    async with database.read() as conn:
        rows = (await conn.execute(select(func.count()).select_from(rate_limit_table))).scalar_one()
    assert rows == 2  # one row per key, reused as windows pass


async def test_refused_hits_count_and_the_wait_is_at_least_a_second(database: Database) -> None:
    clock = Clock()
    limiter = RateLimiter(database, clock=clock)
    rate = Rate(1, timedelta(seconds=30))
    assert (await limiter.hit("k", rate)).allowed
    clock.now += timedelta(seconds=29, milliseconds=999)
    refused = await limiter.hit("k", rate)
    assert (refused.allowed, refused.hits, refused.retry_after(clock.now)) == (False, 2, 1)


async def test_concurrent_hits_are_all_counted(database: Database) -> None:
    rate = Rate(5, timedelta(minutes=1))
    limiters = [RateLimiter(database) for _ in range(20)]
    decisions = await asyncio.gather(*(limiter.hit("busy", rate) for limiter in limiters))
    assert sorted(d.hits for d in decisions) == list(range(1, 21))
    assert sum(d.allowed for d in decisions) == 5


# The GraphQL extension -------------------------------------------------------------------------


def test_the_mutations_that_reach_stripe_carry_the_rate_limit() -> None:
    mutation = schema.get_type_by_name("Mutation")
    assert mutation is not None
    limited = {
        schema.config.name_converter.get_graphql_name(field)
        for field in mutation.fields  # type: ignore[union-attr]
        if any(isinstance(extension, RateLimited) for extension in field.extensions)
    }
    assert limited == STRIPE_MUTATIONS


async def test_the_n_plus_first_stripe_mutation_is_rate_limited(database: Database) -> None:
    token, other = hs256_token("eager"), hs256_token("patient")
    async with serve_api(database, rate_limit_stripe_mutations="3/minute") as api:
        answers = [await api.post(PORTAL, token=token) for _ in range(4)]
        plan_change = await api.query(
            "mutation { previewPlanChange(tier: PRO, interval: MONTHLY) { amountDue } }", token=token
        )
        someone_else = await api.query(PORTAL, token=other)
        anonymous = await api.query(PORTAL)
    assert [error_codes(answer.json()) for answer in answers[:3]] == [["NO_BILLING_ACCOUNT"]] * 3
    refused = answers[3].json()
    assert error_codes(refused) == ["RATE_LIMITED"]
    error = refused["errors"][0]
    assert 1 <= error["extensions"]["retryAfter"] <= 60
    assert error["message"].startswith("too many billing requests: at most 3/minute per user")
    assert refused["data"] is None
    assert answers[3].headers["retry-after"] == str(error["extensions"]["retryAfter"])
    assert "retry-after" not in answers[2].headers
    assert error_codes(plan_change) == ["RATE_LIMITED"]  # one budget for every Stripe mutation
    assert error_codes(someone_else) == ["NO_BILLING_ACCOUNT"]
    assert error_codes(anonymous) == ["UNAUTHENTICATED"]


class Deny(BasePermission):
    message = "never"

    async def has_permission(self, source: Any, info: strawberry.Info[Any, Any], **kwargs: Any) -> bool:
        raise BillingError("not for you", code=ErrorCode.FORBIDDEN_TIER)


@strawberry.type
class Guarded:
    @strawberry.mutation(extensions=[RateLimited("test"), PermissionExtension(permissions=[Deny()])])
    async def guarded(self) -> int:
        return 1

    @strawberry.mutation(extensions=[RateLimited("test")])
    async def open(self) -> int:
        return 2


GUARDED_SCHEMA = build_schema(BillingQuery, mutation=Guarded)


async def test_callers_refused_by_the_permissions_are_not_counted(database: Database) -> None:
    token = hs256_token("refused")
    async with serve_api(database, schema=GUARDED_SCHEMA, rate_limit_stripe_mutations="1/minute") as api:
        refused = [await api.query("mutation { guarded }", token=token) for _ in range(3)]
        first = await api.query("mutation { open }", token=token)
        second = await api.query("mutation { open }", token=token)
    assert [error_codes(answer) for answer in refused] == [["FORBIDDEN_TIER"]] * 3
    assert first == {"data": {"open": 2}}
    assert error_codes(second) == ["RATE_LIMITED"]


async def test_the_rate_limit_can_be_turned_off(database: Database) -> None:
    token = hs256_token("unlimited")
    async with serve_api(database, rate_limit_stripe_mutations="off") as api:
        answers = [await api.query(PORTAL, token=token) for _ in range(12)]
    assert all(error_codes(answer) == ["NO_BILLING_ACCOUNT"] for answer in answers)


# Two processes on one PostgreSQL database --------------------------------------------------------


@pytest.fixture
def two_services(fresh_pg_url: str, tmp_path: Path) -> Iterator[list[str]]:
    env = {
        "DATABASE_URL": fresh_pg_url,
        "SANDBOX_SYNC_CATALOG": "false",
        "WEBHOOK_WORKER": "false",
        "RATE_LIMIT_STRIPE_MUTATIONS": "4/hour",
    }
    subprocess.run(
        [BILLING, "migrate"], env={**os.environ, **env}, check=True, capture_output=True, cwd=tmp_path
    )
    with billing_serve(env, tmp_path, count=2) as urls:
        yield urls


@pytest.mark.postgres_only
async def test_the_budget_is_shared_by_two_processes(two_services: list[str]) -> None:
    async def portal(url: str, user: str) -> list[str]:
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.post(
                f"{url}/graphql",
                json={"query": PORTAL},
                headers={"Authorization": f"Bearer {hs256_token(user)}"},
            )
        assert response.status_code == 200, response.text
        return error_codes(response.json())

    first, second = two_services
    within = [await portal(url, "shared") for url in (first, second, first, second)]
    assert within == [["NO_BILLING_ACCOUNT"]] * 4
    assert await portal(first, "shared") == ["RATE_LIMITED"]
    assert await portal(second, "shared") == ["RATE_LIMITED"]
    assert await portal(second, "another") == ["NO_BILLING_ACCOUNT"]
