"""Single records by group commit (billing/usage/group_commit.py, billing/usage/singles.py):
concurrent one-record calls are written together, and each caller gets its own answer (its
record, a duplicate, or its own refusal) once the group is committed."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

import billing.usage.singles as singles
from billing.errors import BillingError, ErrorCode
from billing.host_events.events import HostEventConfig
from billing.plans import load_catalog
from billing.usage import RecordedUsage, UsageInput, record_usage
from billing.usage.group_commit import GroupCommit
from db.engine import Database
from db.models import host_event_table, usage_table, usage_total_table
from tests.graphql_support import insert_account

CATALOG = load_catalog()


async def test_calls_arriving_during_a_write_are_the_next_group_each_with_its_answer() -> None:
    groups: list[list[int]] = []

    async def write(items: list[int]) -> list[int | Exception]:
        groups.append(items)
        await asyncio.sleep(0.01)
        if 13 in items:
            raise RuntimeError("the database went away")
        return [ValueError(f"no {item}") if item == 3 else item * 10 for item in items]

    group: GroupCommit[int, int] = GroupCommit(write, max_group=4)
    first = [asyncio.ensure_future(group.submit(item)) for item in range(6)]
    await asyncio.sleep(0.005)  # the first group is being written
    later = [asyncio.ensure_future(group.submit(item)) for item in (11, 12, 13)]
    answers = await asyncio.gather(*first, *later, return_exceptions=True)
    assert groups == [[0, 1, 2, 3], [4, 5, 11, 12], [13]]  # at most max_group; nothing waits to fill
    assert answers[:3] == [0, 10, 20] and answers[4:8] == [40, 50, 110, 120]
    assert isinstance(answers[3], ValueError)  # only that caller's
    assert isinstance(answers[8], RuntimeError)
    assert await group.submit(7) == 70  # and the next group is written
    assert groups[-1] == [7]


@pytest.fixture
def group_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    sizes: list[int] = []
    write = singles._write

    async def counted(database: Database, policy: Any, host_events: Any, group: list[Any]) -> Any:
        sizes.append(len(group))
        return await write(database, policy, host_events, group)

    monkeypatch.setattr(singles, "_write", counted)
    return sizes


async def one(database: Database, user: str, key: str, quantity: int, **kw: Any) -> RecordedUsage:
    [recorded] = await record_usage(
        database=database, catalog=CATALOG, records=[UsageInput(user, "api_calls", quantity, key)], **kw
    )
    return recorded


async def test_concurrent_single_records_get_their_own_answers(
    database: Database, group_sizes: list[int]
) -> None:
    if not database.is_postgres:
        pytest.skip("single records go through group commit on PostgreSQL only")
    await insert_account(database, "a", tier="starter")
    await insert_account(database, "b", tier="starter")
    await insert_account(database, "gone", tier="starter", status="canceled")
    calls = [one(database, "a" if n % 2 else "b", f"k{n}", 1 + n % 4) for n in range(40)]
    calls += [one(database, "a", "same", 5) for _ in range(5)]  # one record, four duplicates
    calls += [one(database, "b", "clash", 2), one(database, "b", "clash", 3)]  # one of them conflicts
    calls += [one(database, "nobody", "x", 1), one(database, "gone", "y", 1)]
    answers = await asyncio.gather(*calls, return_exceptions=True)

    assert max(group_sizes) > 1 and sum(group_sizes) == len(calls)  # grouped, each call once
    plain, same, clash, refused = answers[:40], answers[40:45], answers[45:47], answers[47:]
    assert all(isinstance(r, RecordedUsage) and not r.duplicate for r in plain)
    assert [r.quantity for r in plain if isinstance(r, RecordedUsage)] == [1 + n % 4 for n in range(40)]
    assert sorted(r.duplicate for r in same if isinstance(r, RecordedUsage)) == [
        False,
        True,
        True,
        True,
        True,
    ]
    assert len({r.id for r in same if isinstance(r, RecordedUsage)}) == 1
    codes = sorted(r.code.name if isinstance(r, BillingError) else "recorded" for r in clash)
    assert codes == ["IDEMPOTENCY_CONFLICT", "recorded"]
    assert [r.code for r in refused if isinstance(r, BillingError)] == [
        ErrorCode.NO_BILLING_ACCOUNT,
        ErrorCode.NO_SUBSCRIPTION,
    ]
    stored = (
        sum(1 + n % 4 for n in range(40))
        + 5
        + next(r.quantity for r in clash if isinstance(r, RecordedUsage))
    )
    async with database.read() as conn:
        raw = await conn.scalar(select(func.sum(usage_table.c.quantity)))
        totals = await conn.scalar(select(func.sum(usage_total_table.c.quantity)))
        rows = await conn.scalar(select(func.count()).select_from(usage_table))
    assert raw == totals == stored and rows == 40 + 1 + 1


async def test_a_group_crossing_a_threshold_writes_it_once(
    database: Database, group_sizes: list[int]
) -> None:
    if not database.is_postgres:
        pytest.skip("single records go through group commit on PostgreSQL only")
    await insert_account(database, "m", tier="starter")  # 10,000 api_calls
    config = HostEventConfig()
    await one(database, "m", "start", 7_990, host_events=config)
    await asyncio.gather(*(one(database, "m", f"k{n}", 100, host_events=config) for n in range(30)))
    assert max(group_sizes) > 1
    async with database.read() as conn:
        events = [row.payload["data"] for row in await conn.execute(select(host_event_table.c.payload))]
        total = await conn.scalar(select(usage_total_table.c.quantity))
    assert Counter(event["percent"] for event in events) == Counter({80: 1, 100: 1})
    assert total == 7_990 + 3_000
    assert all(event["used"] <= total for event in events)


async def test_a_lone_record_is_written_at_once(database: Database, group_sizes: list[int]) -> None:
    if not database.is_postgres:
        pytest.skip("single records go through group commit on PostgreSQL only")
    await insert_account(database, "a")
    before = datetime.now(UTC)
    recorded = await one(database, "a", "k", 3)
    assert group_sizes == [1] and not recorded.duplicate
    assert before - timedelta(seconds=1) <= recorded.recorded_at <= datetime.now(UTC)
