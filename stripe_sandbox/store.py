"""The sandbox's own database: Stripe objects as JSON documents, events, idempotency, faults.

Its own `MetaData` and engine, in its own SQLite file or PostgreSQL schema, so several service
processes, the CLI and restarts share one Stripe, and the service's migrations never see it.
Every request runs in one transaction under one global lock: an emulator needs correctness,
not write concurrency.
"""

from __future__ import annotations

import json
import secrets
import string
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    delete,
    event,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from stripe_sandbox.errors import resource_missing

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "pk": "pk_%(table_name)s",
    }
)

objects = Table(
    "sbx_object",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),  # creation order, for lists
    Column("id", String(255), nullable=False, unique=True),
    Column("object", String(64), nullable=False, index=True),
    Column("created", BigInteger, nullable=False),
    Column("data", Text, nullable=False),
)

events = Table(
    "sbx_event",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(255), nullable=False, unique=True),
    Column("type", String(128), nullable=False),
    Column("data", Text, nullable=False),
    Column("delivered", Boolean, nullable=False, default=False, index=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", BigInteger, nullable=True),  # real (wall clock) unix seconds
    Column("last_error", Text, nullable=True),
)

# Which registered webhook endpoints an undelivered event has reached already (no resend on retry).
endpoint_deliveries = Table(
    "sbx_endpoint_delivery",
    metadata,
    Column("event_id", String(255), primary_key=True),
    Column("endpoint_id", String(255), primary_key=True),
)

# Every delivery attempt of an event to one endpoint and what it answered (a table of its own, so
# a sandbox database made before it gains it at the next start): the dashboard's event log.
delivery_attempts = Table(
    "sbx_delivery_attempt",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("event_id", String(255), nullable=False, index=True),
    Column("url", Text, nullable=False),
    Column("status", Integer, nullable=True),  # the HTTP status; None when no answer came
    Column("response", Text, nullable=False),  # the answer's start, or the network error
    Column("at", BigInteger, nullable=False),  # real (wall clock) unix seconds
    Column("resend", Boolean, nullable=False, default=False),
)

idempotency = Table(
    "sbx_idempotency",
    metadata,
    Column("key", String(255), primary_key=True),
    Column("fingerprint", String(128), nullable=False),
    Column("status", Integer, nullable=False),
    Column("body", Text, nullable=False),
    Column("created", BigInteger, nullable=False),  # real unix seconds: keys expire after 24 h
)

faults = Table(
    "sbx_fault",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("path_prefix", String(255), nullable=False),
    Column("status", String(16), nullable=False),  # "500", "429", "402", "timeout", "reset"
    Column("code", String(64), nullable=True),
    Column("after_apply", Boolean, nullable=False, default=False),
    Column("remaining", Integer, nullable=False),
    Column("seconds", Float, nullable=True),  # how long a "timeout" fault stalls
)

state = Table(
    "sbx_state",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

_ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str) -> str:
    """Stripe-style ids: `cus_` + 24 random characters."""
    return f"{prefix}_{''.join(secrets.choice(_ALPHABET) for _ in range(24))}"


class Transaction:
    """One request's view of the sandbox: read and write objects, emit events, read the clock."""

    def __init__(self, conn: AsyncConnection, clock_offset: int) -> None:
        self.conn = conn
        self.clock_offset = clock_offset
        self.emitted: list[dict[str, Any]] = []
        self._began = int(time.time())
        self._moment: int | None = None

    def now(self) -> int:
        """The sandbox clock (unix seconds): real time when this transaction began plus every
        `clock/advance` so far, or the moment of the scheduled step being performed (`at`).

        One reading per transaction: everything a request creates carries the same time, and a
        step's events never drift past a second boundary from the step's own time."""
        if self._moment is not None:
            return self._moment
        return self._began + self.clock_offset

    @contextmanager
    def at(self, moment: int) -> Iterator[None]:
        """Perform what Stripe does at `moment` (a renewal, a retry) with the clock reading it."""
        self._moment = moment
        try:
            yield
        finally:
            self._moment = None

    async def find(self, object_id: str) -> dict[str, Any] | None:
        row = (await self.conn.execute(select(objects.c.data).where(objects.c.id == object_id))).first()
        return None if row is None else dict(json.loads(row[0]))

    async def get(self, object_type: str, object_id: str, *, param: str = "id") -> dict[str, Any]:
        """The object, or Stripe's 404 `resource_missing` (also when it is of another type)."""
        found = await self.find(object_id)
        if found is None or found.get("object") != object_type:
            raise resource_missing(object_type.split(".")[-1], object_id, param)
        return found

    async def insert(self, obj: dict[str, Any]) -> dict[str, Any]:
        await self.conn.execute(
            insert(objects).values(
                id=obj["id"],
                object=obj["object"],
                created=obj.get("created", self.now()),
                data=json.dumps(obj),
            )
        )
        return obj

    async def save(self, obj: dict[str, Any]) -> dict[str, Any]:
        await self.conn.execute(update(objects).where(objects.c.id == obj["id"]).values(data=json.dumps(obj)))
        return obj

    async def remove(self, object_id: str) -> None:
        await self.conn.execute(delete(objects).where(objects.c.id == object_id))

    async def all(
        self, object_type: str, where: Callable[[dict[str, Any]], bool] | None = None
    ) -> list[dict[str, Any]]:
        """Every object of a type, newest first (Stripe's list order)."""
        rows = await self.conn.execute(
            select(objects.c.data).where(objects.c.object == object_type).order_by(objects.c.seq.desc())
        )
        found = [json.loads(row[0]) for row in rows]
        return [obj for obj in found if where is None or where(obj)]

    async def emit(
        self,
        event_type: str,
        obj: dict[str, Any],
        *,
        previous_attributes: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Record an event in the outbox, in this transaction; delivery happens after commit."""
        data: dict[str, Any] = {"object": obj}
        if previous_attributes is not None:
            data["previous_attributes"] = previous_attributes
        stripe_event = {
            "id": new_id("evt"),
            "object": "event",
            "account": None,
            "api_version": API_VERSION,
            "context": None,
            "created": self.now(),
            "data": data,
            "livemode": False,
            "pending_webhooks": 1,
            "request": {"id": None, "idempotency_key": None},
            "type": event_type,
        }
        await self.insert(stripe_event)
        await self.conn.execute(
            insert(events).values(
                id=stripe_event["id"],
                type=event_type,
                data=json.dumps(stripe_event),
                delivered=False,
                attempts=0,
                next_attempt_at=int(time.time()),
            )
        )
        self.emitted.append(stripe_event)
        return stripe_event

    async def get_state(self, key: str, default: str) -> str:
        row = (await self.conn.execute(select(state.c.value).where(state.c.key == key))).first()
        return default if row is None else str(row[0])

    async def set_state(self, key: str, value: str) -> None:
        updated = await self.conn.execute(update(state).where(state.c.key == key).values(value=value))
        if updated.rowcount == 0:
            await self.conn.execute(insert(state).values(key=key, value=value))


# The API version the sandbox speaks: the one the installed SDK pins (Stripe's behaviour for it).
def _sdk_api_version() -> str:
    from stripe._api_version import _ApiVersion

    return str(_ApiVersion.CURRENT)


API_VERSION = _sdk_api_version()


GLOBAL_LOCK = 7355608  # the PostgreSQL advisory lock of every sandbox write


class Store:
    """The sandbox database of one process."""

    def __init__(self, url: str, *, schema: str | None = None) -> None:
        self.schema = schema
        self.engine = _create_engine(url, schema)

    @property
    def is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    async def create_tables(self) -> None:
        async with self.engine.begin() as conn:
            if self.is_postgres:
                # Several processes start at once (`billing serve --workers N`): one creates, the
                # others then find it made (CREATE ... IF NOT EXISTS alone races on the catalog).
                await conn.execute(text(f"SELECT pg_advisory_xact_lock({GLOBAL_LOCK})"))
            if self.is_postgres and self.schema:
                await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"'))
                await conn.execute(text(f'SET search_path TO "{self.schema}"'))
            await conn.run_sync(metadata.create_all)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """A write transaction holding the sandbox's global lock, committed on success."""
        async with self.engine.connect() as conn:
            if not self.is_postgres:
                conn = await conn.execution_options(sqlite_begin="IMMEDIATE")
            async with conn.begin():
                if self.is_postgres:
                    await conn.execute(text(f"SELECT pg_advisory_xact_lock({GLOBAL_LOCK})"))
                tx = Transaction(conn, 0)
                tx.clock_offset = int(await tx.get_state("clock_offset", "0"))
                yield tx

    async def dispose(self) -> None:
        await self.engine.dispose()


def _create_engine(url: str, schema: str | None) -> AsyncEngine:
    if url.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine.sync_engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        @event.listens_for(engine.sync_engine, "begin")
        def _on_begin(connection: Any) -> None:
            mode = connection.get_execution_options().get("sqlite_begin", "DEFERRED")
            connection.exec_driver_sql(f"BEGIN {mode}")

        return engine
    connect_args = {"server_settings": {"search_path": schema}} if schema else {}
    return create_async_engine(url, connect_args=connect_args, pool_size=5, max_overflow=5)
