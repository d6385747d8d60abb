"""Engine and transactions for PostgreSQL (asyncpg) and SQLite (aiosqlite).

Code that touches the database asks a `Database` for a connection:

- `db.read()` for reads (no write lock taken on SQLite);
- `db.first(select, parameters)` for a hot read of one row (on PostgreSQL straight through
  asyncpg on a pooled connection: no SQLAlchemy execution around it);
- `db.write_one()` for a single statement that is atomic by itself (no transaction round trips
  on PostgreSQL);
- `db.write()` for a write transaction. On SQLite it starts with `BEGIN IMMEDIATE`, so two
  writers queue on the busy timeout instead of failing half-way with "database is locked".
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

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


_REQUIRED = object()  # a parameter without a value of its own: the caller must give it


def _default(bind: Any) -> Any:
    return _REQUIRED if bind.required else bind.effective_value


@dataclass(frozen=True, slots=True)
class _RawRead:
    """A select compiled once for asyncpg: its SQL, its parameters in order with their bind
    processors, and its columns with their result processors (what SQLAlchemy would apply)."""

    sql: str
    parameters: tuple[tuple[str, Callable[[Any], Any] | None, Any], ...]  # name, processor, default
    columns: tuple[tuple[str, Callable[[Any], Any] | None], ...]

    @classmethod
    def compile(cls, statement: Select[Any], engine: AsyncEngine) -> _RawRead | None:
        dialect = engine.dialect
        compiled = statement.compile(dialect=dialect)
        names = compiled.positiontup
        if names is None or compiled.literal_execute_params or compiled.post_compile_params:
            return None  # expanding (IN) or literal parameters: SQLAlchemy's way
        binds = compiled.binds
        selected = statement.selected_columns
        columns = tuple(
            (key, column.type._cached_result_processor(dialect, None))
            for key, column in zip(selected.keys(), selected, strict=True)
        )
        parameters = tuple(
            (name, binds[name].type._cached_bind_processor(dialect), _default(binds[name])) for name in names
        )
        return cls(sql=compiled.string, parameters=parameters, columns=columns)


class Database:
    """The engine of one process and the ways to use it."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._raw_reads: dict[Select[Any], _RawRead | None] = {}

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> Database:
        return cls(create_engine(url, **kwargs))

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

        On PostgreSQL the statement is compiled once and run by asyncpg itself on a connection
        of the pool, outside any transaction (as `read()`), with SQLAlchemy's bind and result
        processors applied: the same values, at half the CPU of SQLAlchemy's execution of a
        small read (checkout with an isolation switch, execution context, result object).
        Statements with expanding parameters, SQLite, and an engine with `before_cursor_execute`
        listeners take `read()`.
        """
        raw: _RawRead | None = None
        # An engine with cursor listeners (tracing, tests counting statements) keeps SQLAlchemy's
        # execution, so the listeners see every statement.
        if self.is_postgres and not self.engine.sync_engine.dispatch.before_cursor_execute:
            if statement in self._raw_reads:
                raw = self._raw_reads[statement]
            else:
                raw = _RawRead.compile(statement, self.engine)
                if len(self._raw_reads) < 64:
                    self._raw_reads[statement] = raw
        if raw is None:
            async with self.read() as conn:
                row = (await conn.execute(statement, dict(parameters))).mappings().first()
            return None if row is None else dict(row)
        values = [
            parameters[name] if default is _REQUIRED else parameters.get(name, default)
            for name, _process, default in raw.parameters
        ]
        values = [
            value if process is None else process(value)
            for value, (_name, process, _default) in zip(values, raw.parameters, strict=True)
        ]
        async with self.engine.connect() as conn:
            connection = await conn.get_raw_connection()
            try:
                record = await connection.driver_connection.fetchrow(raw.sql, *values)  # type: ignore[union-attr]
            except Exception:
                # As SQLAlchemy would on a lost connection: never hand this one out again.
                await conn.invalidate()
                raise
        if record is None:
            return None
        return {
            key: value if process is None else process(value)
            for (key, process), value in zip(raw.columns, record, strict=True)
        }

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """A transaction committed on success and rolled back on any exception."""
        async with self.engine.connect() as conn:
            if self.is_sqlite:
                conn = await conn.execution_options(sqlite_begin="IMMEDIATE")
            async with conn.begin():
                yield conn

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
        await self.engine.dispose()
