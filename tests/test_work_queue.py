"""The leased work queue behind every background worker, on the webhook inbox's table."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update

from billing.webhooks import INBOX, LEASE, Envelope, store_event
from billing.work_queue import backoff
from db.engine import Database
from db.enums import EventStatus
from db.models import event_table

NOW = datetime(2027, 3, 1, 12, 0, tzinfo=UTC)


async def stored(database: Database, count: int) -> list[str]:
    ids = [f"evt_queue_{n:03d}" for n in range(count)]
    for event_id in ids:
        payload = {"id": event_id, "type": "customer.updated", "data": {"object": {}}}
        envelope = Envelope(event_id, "customer.updated", NOW, payload)
        await store_event(database, envelope, now=NOW)
    return ids


async def claim(database: Database, now: datetime, limit: int = 100) -> list[tuple[str, int]]:
    e = event_table.c
    rows = await INBOX.claim(
        database, now=now, limit=limit, order_by=[e.received_at], returning=[e.id, e.attempts]
    )
    return sorted((row.id, row.attempts) for row in rows)


async def row(database: Database, event_id: str) -> tuple[str, int, str | None]:
    e = event_table.c
    async with database.read() as conn:
        found = (await conn.execute(select(e.status, e.attempts, e.last_error).where(e.id == event_id))).one()
    return found.status, found.attempts, found.last_error


def test_backoff_doubles_from_one_second_and_stops_at_ten_minutes() -> None:
    assert [backoff(n).total_seconds() for n in (0, 1, 2, 3, 10, 11, 500)] == [1, 1, 2, 4, 512, 600, 600]


async def test_a_due_row_is_claimed_once_until_its_lease_runs_out(database: Database) -> None:
    ids = await stored(database, 3)
    assert await claim(database, NOW) == [(event_id, 1) for event_id in ids]
    assert await claim(database, NOW + LEASE) == []  # held: the lease ends strictly after
    # The holder died: once the lease has run out, the rows are claimed again, one attempt more.
    assert await claim(database, NOW + LEASE + timedelta(seconds=1)) == [(event_id, 2) for event_id in ids]
    assert await row(database, ids[0]) == (EventStatus.PROCESSING.value, 2, None)


async def test_concurrent_claims_take_disjoint_rows(database: Database) -> None:
    ids = await stored(database, 40)
    batches = await asyncio.gather(*(claim(database, NOW, limit=7) for _ in range(8)))
    claimed = [event_id for batch in batches for event_id, _ in batch]
    assert sorted(claimed) == ids  # every row once: none twice, none left behind


async def test_a_retried_row_waits_its_backoff_and_keeps_its_last_error(database: Database) -> None:
    [event_id] = await stored(database, 1)
    await claim(database, NOW)
    async with database.write() as conn:
        values = INBOX.retry_later(attempts=3, now=NOW, error="Stripe said no" * 500)
        await conn.execute(update(event_table).where(event_table.c.id == event_id).values(values))
    status, attempts, error = await row(database, event_id)
    assert (status, attempts, len(error or "")) == (EventStatus.PENDING.value, 1, 2000)
    assert await claim(database, NOW + backoff(3) - timedelta(seconds=1)) == []
    assert await claim(database, NOW + backoff(3)) == [(event_id, 2)]
    async with database.write() as conn:
        values = INBOX.retry_later(attempts=2, now=NOW, error=None)
        await conn.execute(update(event_table).where(event_table.c.id == event_id).values(values))
    assert (await row(database, event_id))[2] == error  # no new error: the last one is kept
    async with database.write() as conn:
        values = INBOX.settle(EventStatus.FAILED.value, error="gave up")
        await conn.execute(update(event_table).where(event_table.c.id == event_id).values(values))
    assert await row(database, event_id) == (EventStatus.FAILED.value, 2, "gave up")
    assert await claim(database, NOW + timedelta(days=1)) == []  # settled rows are never due
