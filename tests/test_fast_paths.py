"""The fast paths behind `FAST_PATHS`: asyncpg one-row reads (db/fast_read.py) give what
SQLAlchemy gives, the lean executor (graph/lean_executor.py) answers what Strawberry's view
answers, and the one setting turns both on or off."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import httpx
import pytest
from httpx_ws import aconnect_ws
from sqlalchemy import bindparam, event, select
from strawberry.extensions import SchemaExtension
from strawberry.tools import merge_types

from billing.webhooks import STORE_EVENT
from db.engine import Database
from db.models import account_table, event_table
from db.types import UTCDateTime
from graph.schema import Query as BillingQuery
from graph.schema import build_schema
from tests.graphql_support import error_codes, hs256_token, insert_account, serve_api

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


EVENT_ROW = {
    "type": "invoice.paid",
    "stripe_created": AT,
    "received_at": AT,
    "status": "pending",
    "attempts": 0,
    "next_attempt_at": AT,
    "payload_text": '{"id": "evt"}',
    "trace_context": None,
}


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "sqlalchemy"])
async def test_insert_one_stores_what_sqlalchemy_stores_and_counts_duplicates(
    database: Database, fast: bool
) -> None:
    """The webhook inbox's `INSERT ... ON CONFLICT DO NOTHING` (billing/webhooks.py): 1 for a new
    row, 0 for a duplicate, the same stored values on both paths (a datetime in another zone
    stored as UTC, the payload text parsed as JSON)."""
    database.use_fast_reads(fast)
    insert = STORE_EVENT[database.engine.dialect.name]
    assert await database.insert_one(insert, {"id": "evt_1", **EVENT_ROW}) == 1
    assert await database.insert_one(insert, {"id": "evt_1", **EVENT_ROW}) == 0
    async with database.read() as conn:
        row = (await conn.execute(select(event_table).where(event_table.c.id == "evt_1"))).mappings().one()
    assert row["received_at"] == AT and row["received_at"].tzinfo is UTC
    assert row["payload"] == {"id": "evt"} and row["attempts"] == 0 and row["type"] == "invoice.paid"
    if fast and database.is_postgres:
        assert database.fast_reads is not None
        [(_, compiled)] = database.fast_reads.compiled_inserts.items()
        assert compiled is not None  # asyncpg ran it


@pytest.mark.postgres_only
async def test_an_insert_sqlalchemy_must_complete_is_left_to_it(database: Database) -> None:
    """An insert with RETURNING, or one missing a value SQLAlchemy would compute, is not compiled."""
    database.use_fast_reads(True)
    assert database.fast_reads is not None
    insert = STORE_EVENT["postgresql"]
    returning = insert.returning(event_table.c.id)
    assert await database.insert_one(returning, {"id": "evt_r", **EVENT_ROW}) == 1
    assert database.fast_reads.compiled_inserts[(returning, ("id", *EVENT_ROW))] is None


# The lean executor, and the rules on every path -------------------------------------------------

VIEWER = "{ viewer { subscription { status tier } } }"


@pytest.mark.parametrize("fast_paths", [True, False], ids=["on", "off"])
async def test_fast_paths_setting_turns_both_on_or_off(database: Database, fast_paths: bool) -> None:
    await insert_account(database, "switch")
    async with serve_api(database, fast_paths=fast_paths) as api:
        answer = await api.query(VIEWER, token=hs256_token("switch"))
        lean = api.app.graphql_websocket.lean
    assert answer == {"data": {"viewer": {"subscription": {"status": "ACTIVE", "tier": "PRO"}}}}
    assert (lean is not None) is fast_paths
    assert (database.fast_reads is not None) is (fast_paths and database.is_postgres)


class _SeesOperations(SchemaExtension):
    seen: list[str | None] = []

    def on_operation(self) -> Iterator[None]:
        _SeesOperations.seen.append(self.execution_context.query)
        yield


async def test_strawberrys_path_applies_the_same_rules(db: Database) -> None:
    """A schema with an extension of its own is served by Strawberry's view whatever the
    setting: the view still refuses over the limits, codes every error, and the refused
    documents never reach the schema (its extension sees only the operation that ran)."""
    _SeesOperations.seen.clear()
    host = build_schema(merge_types("Query", (BillingQuery,)), extensions=[_SeesOperations])
    aliases = "{ " + " ".join(f"a{i}: plans {{ id }}" for i in range(3)) + " }"
    async with serve_api(db, schema=host, graphql_max_aliases=2) as api:
        assert api.app.graphql_websocket.lean is None
        over = await api.query(aliases)
        unparsed = await api.query("{ plans { id }")
        unknown = await api.query("{ plans { nope } }")
        bad_argument = await api.query("{ access(feature: 42) { allowed } }")
        accepted = await api.query("{ plans { id } }")
    assert [error["extensions"] for error in over["errors"]] == [
        {"code": "QUERY_TOO_COMPLEX", "limit": "aliases", "maximum": 2}
    ]
    assert error_codes(unparsed) == ["GRAPHQL_PARSE_FAILED"]
    assert error_codes(unknown) == ["GRAPHQL_VALIDATION_FAILED"]
    assert error_codes(bad_argument) == ["BAD_USER_INPUT"]
    assert len(accepted["data"]["plans"]) == 4
    assert _SeesOperations.seen == ["{ plans { id } }"]


async def test_a_websocket_operation_whose_query_is_not_text_is_left_to_strawberry(db: Database) -> None:
    """The view checks text only: anything else gets Strawberry's own answer, and the
    connection goes on serving."""
    token = hs256_token("not-text")
    async with (
        serve_api(db) as api,
        httpx.AsyncClient() as client,
        aconnect_ws(api.endpoint, client, subprotocols=["graphql-transport-ws"]) as ws,
    ):
        await ws.send_json({"type": "connection_init", "payload": {"Authorization": f"Bearer {token}"}})
        assert (await ws.receive_json(timeout=5))["type"] == "connection_ack"
        await ws.send_json({"id": "1", "type": "subscribe", "payload": {"query": {"not": "text"}}})
        ended = await ws.receive_json(timeout=5)
        await ws.send_json({"id": "2", "type": "subscribe", "payload": {"query": "{ plans { id } }"}})
        answer = await ws.receive_json(timeout=5)
    assert ended["id"] == "1" and ended["type"] in {"error", "complete"}, ended
    assert answer["id"] == "2" and len(answer["payload"]["data"]["plans"]) == 4, answer
