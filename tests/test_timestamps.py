"""Every stored time is timezone-aware UTC, on both databases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import insert, select
from sqlalchemy.exc import StatementError

from db.engine import Database
from db.models import account_table

NOW = datetime(2026, 11, 27, 12, 30, 15, 123456, tzinfo=UTC)


def account(user_id: str, **values: object) -> dict[str, object]:
    return {"user_id": user_id, "created_at": NOW, "updated_at": NOW, **values}


async def test_an_aware_time_comes_back_aware_and_in_utc(database: Database) -> None:
    plus_two = timezone(timedelta(hours=2))
    async with database.write() as conn:
        await conn.execute(
            insert(account_table).values(account("u1", current_period_end=NOW.astimezone(plus_two)))
        )
    async with database.read() as conn:
        stored = (await conn.execute(select(account_table.c.current_period_end))).scalar_one()
    assert stored == NOW
    assert stored.utcoffset() == timedelta(0)


async def test_a_naive_time_is_refused_and_nothing_is_written(database: Database) -> None:
    with pytest.raises(StatementError, match="naive datetime"):
        async with database.write() as conn:
            await conn.execute(insert(account_table).values(account("u1", trial_end=datetime(2026, 1, 1))))
    async with database.read() as conn:
        assert (await conn.execute(select(account_table.c.id))).all() == []


async def test_times_compare_in_time_order(database: Database) -> None:
    async with database.write() as conn:
        for offset_hours, user in [(-1, "early"), (5, "late")]:
            value = (NOW + timedelta(hours=offset_hours)).astimezone(
                timezone(timedelta(hours=-offset_hours * 2))
            )
            await conn.execute(insert(account_table).values(account(user, trial_end=value)))
    async with database.read() as conn:
        later = (
            (await conn.execute(select(account_table.c.user_id).where(account_table.c.trial_end > NOW)))
            .scalars()
            .all()
        )
    assert later == ["late"]
