"""The fast paths behind `FAST_PATHS`: asyncpg one-row reads (db/fast_read.py) give what
SQLAlchemy gives, and the setting turns them off."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import bindparam, event, select

from db.engine import Database
from db.models import account_table
from db.types import UTCDateTime
from tests.test_graphql_support import insert_account

c = account_table.c
ONE_ACCOUNT = select(
    c.id,
    c.user_id,
    c.status,
    c.tier,
    c.current_period_start,
    c.trial_used,
    c.canceled_at,
    bindparam("at", type_=UTCDateTime).label("at"),
).where(c.user_id == bindparam("user_id"))
AT = datetime(2026, 3, 1, 12, 30, tzinfo=timezone(timedelta(hours=2)))


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "sqlalchemy"])
async def test_first_returns_what_sqlalchemy_returns(database: Database, fast: bool) -> None:
    """Bind and result processing as SQLAlchemy's: aware UTC datetimes out, a datetime in another
    zone stored as UTC; one row type (a dict) on both paths; no row is None."""
    await insert_account(database, "same", status="trialing", tier="pro")
    database.use_fast_reads(fast)
    hot = await database.first(ONE_ACCOUNT, {"user_id": "same", "at": AT})
    async with database.read() as conn:
        row = (await conn.execute(ONE_ACCOUNT, {"user_id": "same", "at": AT})).first()
    assert row is not None and type(hot) is dict
    assert hot == row._asdict()
    assert hot["at"] == AT and hot["at"].tzinfo is UTC and hot["current_period_start"].tzinfo is UTC
    assert await database.first(ONE_ACCOUNT, {"user_id": "nobody", "at": AT}) is None
    assert (database.fast_reads is not None) == (fast and database.is_postgres)


@pytest.mark.postgres_only
async def test_fast_reads_go_through_asyncpg_unless_the_engine_is_watched(database: Database) -> None:
    await insert_account(database, "watched")
    database.use_fast_reads(True)
    assert database.fast_reads is not None
    statements: list[str] = []

    def record(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        statements.append(statement)

    await database.first(ONE_ACCOUNT, {"user_id": "watched", "at": AT})
    assert statements == [] and database.fast_reads.compiled[ONE_ACCOUNT] is not None
    event.listen(database.engine.sync_engine, "before_cursor_execute", record)
    try:
        watched = await database.first(ONE_ACCOUNT, {"user_id": "watched", "at": AT})
    finally:
        event.remove(database.engine.sync_engine, "before_cursor_execute", record)
    assert watched is not None and watched["user_id"] == "watched" and len(statements) == 1


@pytest.mark.postgres_only
async def test_an_expanding_parameter_is_left_to_sqlalchemy(database: Database) -> None:
    await insert_account(database, "listed")
    database.use_fast_reads(True)
    assert database.fast_reads is not None
    statement = select(c.user_id).where(c.user_id.in_(bindparam("users", expanding=True)))
    assert (await database.first(statement, {"users": ["listed", "other"]})) == {"user_id": "listed"}
    assert database.fast_reads.compiled[statement] is None
