"""Recording usage: idempotent, all or nothing, every refusal coded, over GraphQL and in Python."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from billing.errors import BillingError, ErrorCode
from billing.plans import load_catalog
from billing.usage import UsageInput, record_usage
from db.engine import Database
from db.models import rollup_table, usage_table
from tests.graphql_support import SERVICE_KEY, Api, hs256_token, insert_account, serve_api

CATALOG = load_catalog()
RECORD = """mutation($input: RecordUsageInput!) {
  recordUsage(input: $input) { id userId feature quantity recordedAt idempotencyKey duplicate }
}"""
BATCH = """mutation($inputs: [RecordUsageInput!]!) {
  recordUsageBatch(inputs: $inputs) { id userId feature quantity idempotencyKey duplicate }
}"""


@pytest.fixture
async def api(database: Database) -> AsyncIterator[Api]:
    async with serve_api(database, service_api_key=SERVICE_KEY, usage_reporter=False) as served:
        yield served


async def tables(database: Database) -> tuple[list[Any], list[Any]]:
    """Every usage record and rollup row, to check that a refusal wrote nothing."""
    async with database.read() as conn:
        records = list(
            await conn.execute(
                select(
                    usage_table.c.account_id,
                    usage_table.c.feature,
                    usage_table.c.quantity,
                    usage_table.c.idempotency_key,
                ).order_by(usage_table.c.id)
            )
        )
        rollups = list(await conn.execute(select(rollup_table).order_by(rollup_table.c.hour)))
    return records, rollups


def item(user: str = "member", key: str = "k-1", quantity: int = 5, **extra: Any) -> dict[str, Any]:
    return {"userId": user, "feature": "api_calls", "quantity": quantity, "idempotencyKey": key, **extra}


# Idempotency -----------------------------------------------------------------------------------


async def test_the_same_key_records_once_and_returns_the_original(database: Database, api: Api) -> None:
    await insert_account(database, "member", tier="starter")
    first = await api.query(RECORD, {"input": item(quantity=7)}, token=SERVICE_KEY)
    again = await api.query(RECORD, {"input": item(quantity=7)}, token=SERVICE_KEY)

    original = first["data"]["recordUsage"]
    assert original["duplicate"] is False and original["quantity"] == 7 and original["userId"] == "member"
    replay = again["data"]["recordUsage"]
    assert replay == {**original, "duplicate": True}
    records, rollups = await tables(database)
    assert [(r.feature, r.quantity, r.idempotency_key) for r in records] == [("api_calls", 7, "k-1")]
    assert [r.quantity for r in rollups] == [7]


async def test_the_same_key_for_another_use_is_a_conflict_and_changes_nothing(
    database: Database, api: Api
) -> None:
    await insert_account(database, "member", tier="starter")
    await api.query(RECORD, {"input": item(quantity=7)}, token=SERVICE_KEY)
    before = await tables(database)

    other_quantity = await api.query(RECORD, {"input": item(quantity=8)}, token=SERVICE_KEY)
    other_feature = await api.query(
        RECORD, {"input": {**item(quantity=7), "feature": "storage_gb"}}, token=SERVICE_KEY
    )

    for result in (other_quantity, other_feature):
        (error,) = result["errors"]
        assert error["extensions"]["code"] == "IDEMPOTENCY_CONFLICT"
        assert error["extensions"]["field"] == "idempotencyKey"
        assert result["data"] is None
    assert await tables(database) == before


async def test_keys_are_per_user(database: Database, api: Api) -> None:
    await insert_account(database, "ada", tier="starter")
    await insert_account(database, "grace", tier="pro")
    result = await api.query(
        BATCH, {"inputs": [item("ada", "same", 2), item("grace", "same", 3)]}, token=SERVICE_KEY
    )
    assert [(r["userId"], r["quantity"], r["duplicate"]) for r in result["data"]["recordUsageBatch"]] == [
        ("ada", 2, False),
        ("grace", 3, False),
    ]
    records, rollups = await tables(database)
    assert len(records) == 2 and sorted(r.quantity for r in rollups) == [2, 3]


async def test_a_batch_repeating_a_key_records_it_once(database: Database, api: Api) -> None:
    await insert_account(database, "member", tier="starter")
    await api.query(RECORD, {"input": item(key="old", quantity=1)}, token=SERVICE_KEY)
    result = await api.query(
        BATCH,
        {"inputs": [item(key="a", quantity=2), item(key="a", quantity=2), item(key="old", quantity=1)]},
        token=SERVICE_KEY,
    )
    answers = result["data"]["recordUsageBatch"]
    assert [a["duplicate"] for a in answers] == [False, True, True]
    assert answers[0]["id"] == answers[1]["id"]
    records, rollups = await tables(database)
    assert sorted(r.idempotency_key for r in records) == ["a", "old"]
    assert sum(r.quantity for r in rollups) == 3


async def test_a_batch_with_one_conflicting_item_writes_nothing(database: Database, api: Api) -> None:
    await insert_account(database, "member", tier="starter")
    result = await api.query(
        BATCH,
        {"inputs": [item(key="x", quantity=1), item(key="y", quantity=1), item(key="x", quantity=2)]},
        token=SERVICE_KEY,
    )
    (error,) = result["errors"]
    assert error["extensions"]["code"] == "IDEMPOTENCY_CONFLICT" and error["extensions"]["index"] == 2
    assert await tables(database) == ([], [])


async def test_record_usage_in_python_for_embedding_host_apps(database: Database) -> None:
    await insert_account(database, "member", tier="pro")
    at = datetime.now(UTC) - timedelta(hours=2)
    records = [
        UsageInput("member", "api_calls", 10, "py-1", at),
        UsageInput("member", "storage_gb", 2, "py-2"),
    ]
    first = await record_usage(database=database, catalog=CATALOG, records=records)
    second = await record_usage(database=database, catalog=CATALOG, records=records)

    assert [(r.feature, r.quantity, r.duplicate) for r in first] == [
        ("api_calls", 10, False),
        ("storage_gb", 2, False),
    ]
    assert first[0].recorded_at == at
    assert [r.duplicate for r in second] == [True, True]
    assert [r.id for r in second] == [r.id for r in first]
    with pytest.raises(BillingError) as conflict:
        await record_usage(
            database=database, catalog=CATALOG, records=[UsageInput("member", "api_calls", 11, "py-1")]
        )
    assert conflict.value.code is ErrorCode.IDEMPOTENCY_CONFLICT
    assert len((await tables(database))[0]) == 2


@pytest.mark.postgres_only
async def test_concurrent_recordings_of_one_key_count_once(database: Database) -> None:
    await insert_account(database, "member", tier="pro")

    async def one() -> Any:
        return await record_usage(
            database=database, catalog=CATALOG, records=[UsageInput("member", "api_calls", 4, "same-key")]
        )

    results = await asyncio.gather(*(one() for _ in range(20)))

    ids = {result[0].id for result in results}
    assert len(ids) == 1
    assert sorted(result[0].duplicate for result in results) == [False] + [True] * 19
    records, rollups = await tables(database)
    assert len(records) == 1 and [r.quantity for r in rollups] == [4]


async def test_concurrent_recordings_of_distinct_keys_lose_nothing(database: Database) -> None:
    """The rollup upsert adds under concurrency (no lost update); SQLite queues the writers."""
    await insert_account(database, "member", tier="pro")
    now = datetime.now(UTC).replace(minute=30)

    async def one(n: int) -> Any:
        return await record_usage(
            database=database,
            catalog=CATALOG,
            records=[UsageInput("member", "api_calls", n, f"key-{n}", now - timedelta(minutes=n % 3))],
            now=now,
        )

    await asyncio.gather(*(one(n) for n in range(1, 31)))

    async with database.read() as conn:
        raw = (await conn.execute(select(func.sum(usage_table.c.quantity)))).scalar()
        rolled = (await conn.execute(select(func.sum(rollup_table.c.quantity)))).scalar()
    assert int(raw) == int(rolled) == sum(range(1, 31))


# Refusals: exact code, the item named, nothing written -------------------------------------------


def _at(delta: timedelta) -> str:
    return (datetime.now(UTC) + delta).isoformat()


REFUSALS = [
    # (what, input overrides, code, field)
    ("unknown feature", {"feature": "teleportation"}, "BAD_USER_INPUT", "feature"),
    ("malformed feature", {"feature": "api calls!"}, "BAD_USER_INPUT", "feature"),
    ("zero quantity", {"quantity": 0}, "BAD_USER_INPUT", "quantity"),
    ("negative quantity", {"quantity": -3}, "BAD_USER_INPUT", "quantity"),
    ("quantity above the maximum", {"quantity": 1_000_001}, "BAD_USER_INPUT", "quantity"),
    ("empty idempotency key", {"idempotencyKey": ""}, "BAD_USER_INPUT", "idempotencyKey"),
    ("too far in the future", {"recordedAt": timedelta(minutes=6)}, "BAD_USER_INPUT", "recordedAt"),
    ("older than 35 days", {"recordedAt": -timedelta(days=35, minutes=1)}, "BAD_USER_INPUT", "recordedAt"),
    ("without a time zone", {"recordedAt": "2026-01-01T00:00:00"}, "BAD_USER_INPUT", "recordedAt"),
    ("unknown user", {"userId": "stranger"}, "NO_BILLING_ACCOUNT", None),
    ("canceled subscription", {"userId": "lapsed"}, "NO_SUBSCRIPTION", None),
    ("never subscribed", {"userId": "visitor"}, "NO_SUBSCRIPTION", None),
    ("past due beyond the grace period", {"userId": "overdue"}, "NO_SUBSCRIPTION", None),
]


def _resolve(overrides: dict[str, Any]) -> dict[str, Any]:
    return {key: _at(value) if isinstance(value, timedelta) else value for key, value in overrides.items()}


async def _accounts(database: Database) -> None:
    await insert_account(database, "member", tier="starter")
    await insert_account(database, "lapsed", status="canceled", tier="pro")
    await insert_account(database, "visitor", status="none", tier="none", interval=None)
    await insert_account(
        database,
        "overdue",
        status="past_due",
        tier="pro",
        period_start=datetime.now(UTC) - timedelta(days=9),
    )


@pytest.mark.parametrize(("what", "overrides", "code", "field"), REFUSALS, ids=[r[0] for r in REFUSALS])
async def test_each_refusal_has_its_code_names_the_item_and_writes_nothing(
    database: Database, api: Api, what: str, overrides: dict[str, Any], code: str, field: str | None
) -> None:
    await _accounts(database)
    await api.query(RECORD, {"input": item(key="earlier", quantity=3)}, token=SERVICE_KEY)
    before = await tables(database)
    bad = {**item(key="bad"), **_resolve(overrides)}

    single = await api.query(RECORD, {"input": bad}, token=SERVICE_KEY)
    batch = await api.query(
        BATCH,
        {"inputs": [item(key="good-1"), item(key="good-2"), bad, item(key="good-3")]},
        token=SERVICE_KEY,
    )

    (error,) = single["errors"]
    assert error["extensions"]["code"] == code, error
    assert error["extensions"]["index"] == 0
    if field is not None:
        assert error["extensions"]["field"] == field
    (batch_error,) = batch["errors"]
    assert batch_error["extensions"]["code"] == code
    assert batch_error["extensions"]["index"] == 2
    assert single["data"] is None and batch["data"] is None
    assert await tables(database) == before


async def test_the_maximum_quantity_is_a_setting(database: Database) -> None:
    await insert_account(database, "member", tier="starter")
    async with serve_api(
        database, service_api_key=SERVICE_KEY, usage_reporter=False, usage_max_quantity=10
    ) as api:
        at_max = await api.query(RECORD, {"input": item(key="a", quantity=10)}, token=SERVICE_KEY)
        above = await api.query(RECORD, {"input": item(key="b", quantity=11)}, token=SERVICE_KEY)
    assert at_max["data"]["recordUsage"]["quantity"] == 10
    assert above["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"
    assert "between 1 and 10" in above["errors"][0]["message"]


async def test_the_window_edges_are_inclusive_inside_stripes_limits(database: Database) -> None:
    now = datetime(2026, 6, 15, 12, 0, tzinfo=UTC)
    await insert_account(database, "fixed", tier="starter", period_start=now - timedelta(days=3))
    edges = [
        UsageInput("fixed", "api_calls", 1, "future", now + timedelta(minutes=5)),
        UsageInput("fixed", "api_calls", 1, "past", now - timedelta(days=35)),
    ]
    recorded = await record_usage(database=database, catalog=CATALOG, records=edges, now=now)
    assert [r.recorded_at for r in recorded] == [now + timedelta(minutes=5), now - timedelta(days=35)]


async def test_batches_are_limited_to_a_thousand(database: Database, api: Api) -> None:
    await insert_account(database, "member", tier="pro")
    inputs = [item(key=f"k{n}", quantity=1) for n in range(1001)]
    refused = await api.query(BATCH, {"inputs": inputs}, token=SERVICE_KEY)
    accepted = await api.query(BATCH, {"inputs": inputs[:1000]}, token=SERVICE_KEY)
    assert refused["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"
    assert len(accepted["data"]["recordUsageBatch"]) == 1000
    records, rollups = await tables(database)
    assert len(records) == 1000 and sum(r.quantity for r in rollups) == 1000


async def test_only_the_service_key_records_usage(database: Database, api: Api) -> None:
    await insert_account(database, "member", tier="starter")
    as_user = await api.query(RECORD, {"input": item()}, token=hs256_token("member"))
    anonymous = await api.query(RECORD, {"input": item()})
    assert as_user["errors"][0]["extensions"]["code"] == "FORBIDDEN"
    assert anonymous["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
    assert await tables(database) == ([], [])
