"""Engine and transactions for PostgreSQL (asyncpg) and SQLite (aiosqlite).

Code that touches the database asks a `Database` for a connection:

- `db.read()` for reads (no write lock taken on SQLite);
- `db.first(select, parameters)` for a hot read of one row (with fast reads, `db.fast_read`,
  asyncpg runs it on a pool of its own: no SQLAlchemy execution around it);
- `db.insert_one(insert, parameters)` for a hot `INSERT ... ON CONFLICT` (with fast reads,
  asyncpg runs it compiled once);
- `db.write_one()` for a single statement that is atomic by itself (no transaction round trips
  on PostgreSQL);
- `db.write()` for a write transaction. On SQLite it starts with `BEGIN IMMEDIATE`, so two
  writers queue on the busy timeout instead of failing half-way with "database is locked".
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import Insert, Select, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from db.fast_read import FastReads

SQLITE_BUSY_TIMEOUT_MS = 10_000

_DRIVERS = {
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
    "postgresql+asyncpg": "postgresql+asyncpg",
    "sqlite": "sqlite+aiosqlite",
    "sqlite+aiosqlite": "sqlite+aiosqlite",
}


class DatabaseURLError(ValueError):
    """The database URL cannot be used."""


def parse_database_url(raw: str) -> URL:
    """Parse and normalise a database URL to one of the two supported async drivers."""
    try:
        url = make_url(raw)
    except ArgumentError as exc:
        raise DatabaseURLError(f"cannot parse {raw!r} as a database URL") from exc
    driver = _DRIVERS.get(url.drivername)
    if driver is None:
        raise DatabaseURLError(
            f"unsupported driver {url.drivername!r}: use postgresql+asyncpg:// or sqlite+aiosqlite://"
        )
    return url.set(drivername=driver)


def safe_url(url: URL | str) -> str:
    """The URL with its password hidden, for messages and logs."""
    return (make_url(url) if isinstance(url, str) else url).render_as_string(hide_password=True)


def create_engine(url: URL | str, *, schema: str | None = None, **kwargs: Any) -> AsyncEngine:
    """Create the one engine of a process. `schema` sets PostgreSQL's search_path (tests)."""
    url = parse_database_url(str(url) if isinstance(url, str) else url.render_as_string(False))
    if url.get_backend_name() == "sqlite":
        engine = create_async_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}, **kwargs)
        _configure_sqlite(engine)
        return engine
    connect_args: dict[str, Any] = {}
    if schema:
        connect_args["server_settings"] = {"search_path": schema}
    # A fixed pool: an overflow connection is opened for one checkout and closed on return, and
    # under load that is a new PostgreSQL backend (a fork and a TLS attempt) per request (bench/).
    kwargs.setdefault("pool_size", 20)
    kwargs.setdefault("max_overflow", 0)
    return create_async_engine(url, connect_args=connect_args, **kwargs)


def _configure_sqlite(engine: AsyncEngine) -> None:
    sync_engine = engine.sync_engine

    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy emit BEGIN itself (pysqlite's implicit BEGIN is deferred and late).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        mode = connection.get_execution_options().get("sqlite_begin", "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")


class Database:
    """The engine of one process and the ways to use it."""

    def __init__(self, engine: AsyncEngine, *, fast_reads: bool = False) -> None:
        self.engine = engine
        self.fast_reads: FastReads | None = None
        self._retired: list[FastReads] = []
        self.use_fast_reads(fast_reads)

    @classmethod
    def from_url(cls, url: str, *, fast_reads: bool = False, **kwargs: Any) -> Database:
        return cls(create_engine(url, **kwargs), fast_reads=fast_reads)

    def use_fast_reads(self, enabled: bool) -> None:
        """`first()` through asyncpg itself (db.fast_read) when enabled, on PostgreSQL."""
        if not enabled or not self.is_postgres:
            if self.fast_reads is not None:
                self._retired.append(self.fast_reads)  # its pool, if opened, is closed by dispose()
            self.fast_reads = None
        elif self.fast_reads is None:
            self.fast_reads = FastReads(self.engine)

    @property
    def is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """Reads without a transaction on PostgreSQL: no BEGIN and ROLLBACK round trips around
        each query. Each statement sees its own snapshot, as it would in a READ COMMITTED one."""
        async with self.engine.connect() as conn:
            if self.is_postgres:
                conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            yield conn

    async def first(self, statement: Select[Any], parameters: Mapping[str, Any]) -> dict[str, Any] | None:
        """The first row of `statement` as a dict keyed by its column names, or None.

        With fast reads (PostgreSQL, `FAST_PATHS`) asyncpg runs it on a pooled connection, else
        SQLAlchemy as `read()` does: the same values either way.
        """
        if self.fast_reads is not None:
            read = self.fast_reads.read_for(statement)
            if read is not None:
                return await self.fast_reads.first(read, parameters)
        async with self.read() as conn:
            row = (await conn.execute(statement, dict(parameters))).mappings().first()
        return None if row is None else dict(row)

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """A transaction committed on success and rolled back on any exception."""
        async with self.engine.connect() as conn:
            if self.is_sqlite:
                conn = await conn.execution_options(sqlite_begin="IMMEDIATE")
            async with conn.begin():
                yield conn

    async def insert_one(self, statement: Insert, parameters: Mapping[str, Any]) -> int:
        """One `INSERT ... ON CONFLICT` (atomic by itself): the number of rows it inserted.

        With fast reads (PostgreSQL, `FAST_PATHS`) asyncpg runs it compiled once, in autocommit,
        as `first()` runs reads; else SQLAlchemy in `write_one()`: the same rows either way.
        """
        if self.fast_reads is not None:
            insert = self.fast_reads.insert_for(statement, tuple(parameters))
            if insert is not None:
                return await self.fast_reads.insert(insert, parameters)
        async with self.write_one() as conn:
            result = await conn.execute(statement, dict(parameters))
        return int(result.rowcount)

    @asynccontextmanager
    async def write_one(self) -> AsyncIterator[AsyncConnection]:
        """For one statement that is atomic by itself (an `INSERT ... ON CONFLICT`): in autocommit
        on PostgreSQL, without the BEGIN and COMMIT round trips; a `write()` transaction on SQLite."""
        if not self.is_postgres:
            async with self.write() as conn:
                yield conn
            return
        async with self.engine.connect() as conn:
            yield await conn.execution_options(isolation_level="AUTOCOMMIT")

    async def dispose(self) -> None:
        for fast_reads in [*self._retired, *([self.fast_reads] if self.fast_reads is not None else [])]:
            await fast_reads.close()
        self._retired = []
        await self.engine.dispose()
