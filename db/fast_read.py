"""One-row reads and inserts run by asyncpg itself, on a pool of its own (`FAST_PATHS`).

SQLAlchemy's execution of a small read (a checkout with an isolation switch, an execution
context, a result object, in greenlets) costs about as much CPU as the rest of the viewer
query's database work (bench/RESULTS.md, fix 9), and its pool checkout alone, in greenlets, as
much as asyncpg's own execution of the statement (fix 18). Here a statement is compiled once
for the engine's dialect and run by asyncpg's `fetchrow` or `execute`, with the bind and result
processors SQLAlchemy would apply to each parameter and column (UTC datetimes in and out),
outside any transaction, as `Database.read()` reads, on a small asyncpg pool opened on first use
with the engine's connection arguments and search path. Each statement stands alone in
autocommit, so a connection goes back to that pool without asyncpg's reset round trip.

What it relies on beyond SQLAlchemy's everyday API (pinned below its next minor version in
pyproject.toml; `tests/test_pinned_internals.py` fails when it changes): the compiled
statement's `positiontup`, `binds`, `literal_execute_params` and `post_compile_params`, an
insert's `_returning` (its public `exported_columns` can be stale: `.returning()` copies the
statement with that property already computed), and the engine's
`dispatch.before_cursor_execute` listener collection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy import Insert, Select
from sqlalchemy.ext.asyncio import AsyncEngine

MAX_STATEMENTS = 64  # distinct statements compiled and kept; the service reads a handful
POOL_SIZE = 10  # connections of the fast paths' own pool, beside the engine's
POOL_IDLE_SECONDS = 60.0  # an idle connection of that pool is closed after this
# Arguments of SQLAlchemy's asyncpg dialect that asyncpg's connect does not take.
_DIALECT_ONLY = ("prepared_statement_cache_size", "prepared_statement_name_func", "async_fallback")

_REQUIRED = object()  # a parameter without a value of its own: the caller must give it


@dataclass(frozen=True, slots=True)
class CompiledRead:
    """A select compiled for asyncpg: its SQL, its parameters in order with their bind
    processors and defaults, and its columns with their result processors."""

    sql: str
    parameters: tuple[tuple[str, Callable[[Any], Any] | None, Any], ...]  # name, processor, default
    columns: tuple[tuple[str, Callable[[Any], Any] | None], ...]

    @classmethod
    def compile(
        cls, statement: Select[Any] | Insert, engine: AsyncEngine, keys: tuple[str, ...] = ()
    ) -> CompiledRead | None:
        """None for a statement asyncpg cannot take as compiled (expanding or literal parameters).

        An insert (without RETURNING) is compiled for the columns `keys` it is given values of,
        as SQLAlchemy compiles it for the keys of its parameters; None when the compiled insert
        needs anything more (a column default SQLAlchemy would compute at execution).
        """
        dialect = engine.dialect
        compiled = statement.compile(dialect=dialect, column_keys=list(keys) if keys else None)
        names = compiled.positiontup
        if names is None or compiled.literal_execute_params or compiled.post_compile_params:
            return None
        binds = compiled.binds
        if isinstance(statement, Insert):
            if statement._returning or not set(names) <= {*keys, *(n for n in binds if binds[n].required)}:
                return None
            columns: tuple[tuple[str, Callable[[Any], Any] | None], ...] = ()
        else:
            selected = statement.selected_columns
            columns = tuple(
                (key, column.type.dialect_impl(dialect).result_processor(dialect, None))
                for key, column in zip(selected.keys(), selected, strict=True)
            )
        parameters = tuple(
            (
                name,
                binds[name].type.dialect_impl(dialect).bind_processor(dialect),
                _REQUIRED if binds[name].required else binds[name].effective_value,
            )
            for name in names
        )
        return cls(sql=compiled.string, parameters=parameters, columns=columns)

    def values(self, parameters: Mapping[str, Any]) -> list[Any]:
        """The positional values of `parameters`, processed as SQLAlchemy would bind them."""
        values = []
        for name, process, default in self.parameters:
            value = parameters[name] if default is _REQUIRED else parameters.get(name, default)
            values.append(value if process is None else process(value))
        return values

    def row(self, record: Any) -> dict[str, Any]:
        return {
            key: value if process is None else process(value)
            for (key, process), value in zip(self.columns, record, strict=True)
        }


class FastReads:
    """The compiled reads of one engine. Only for PostgreSQL (asyncpg)."""

    def __init__(self, engine: AsyncEngine) -> None:
        if engine.dialect.name != "postgresql":
            raise ValueError("fast reads run on asyncpg: PostgreSQL only")
        self.engine = engine
        self.compiled: dict[Select[Any], CompiledRead | None] = {}
        self.compiled_inserts: dict[tuple[Insert, tuple[str, ...]], CompiledRead | None] = {}
        self._pool: Any = None  # asyncpg.Pool, opened on first use
        self._opening = asyncio.Lock()

    def read_for(self, statement: Select[Any]) -> CompiledRead | None:
        """`statement` compiled, or None when SQLAlchemy must run it: a statement asyncpg cannot
        take as compiled, or an engine with cursor listeners (tracing, tests counting statements),
        which must see every statement."""
        if self.engine.sync_engine.dispatch.before_cursor_execute:
            return None
        if statement in self.compiled:
            return self.compiled[statement]
        read = CompiledRead.compile(statement, self.engine)
        if len(self.compiled) < MAX_STATEMENTS:
            self.compiled[statement] = read
        return read

    def insert_for(self, statement: Insert, keys: tuple[str, ...]) -> CompiledRead | None:
        """`read_for` for an insert given values of the columns `keys`."""
        if self.engine.sync_engine.dispatch.before_cursor_execute:
            return None
        if (statement, keys) in self.compiled_inserts:
            return self.compiled_inserts[(statement, keys)]
        insert = CompiledRead.compile(statement, self.engine, keys)
        if len(self.compiled_inserts) < MAX_STATEMENTS:
            self.compiled_inserts[(statement, keys)] = insert
        return insert

    async def insert(self, insert: CompiledRead, parameters: Mapping[str, Any]) -> int:
        """Run a compiled insert in autocommit; the number of rows it inserted."""
        pool = self._pool or await self._open()
        status: str = await pool.execute(insert.sql, *insert.values(parameters))
        return int(status.rsplit(" ", 1)[-1])

    async def first(self, read: CompiledRead, parameters: Mapping[str, Any]) -> dict[str, Any] | None:
        pool = self._pool or await self._open()
        record = await pool.fetchrow(read.sql, *read.values(parameters))
        return None if record is None else read.row(record)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def _open(self) -> Any:
        """The pool, opened on first use: the engine's connection arguments and search path."""
        async with self._opening:
            if self._pool is None:
                async with self.engine.connect() as conn:
                    search_path = (await conn.exec_driver_sql("SHOW search_path")).scalar_one()
                _args, params = self.engine.dialect.create_connect_args(self.engine.url)
                for key in _DIALECT_ONLY:
                    params.pop(key, None)
                self._pool = await asyncpg.create_pool(
                    **params,
                    server_settings={"search_path": search_path},
                    min_size=0,
                    max_size=POOL_SIZE,
                    max_inactive_connection_lifetime=POOL_IDLE_SECONDS,
                    reset=_standalone,
                )
        return self._pool


async def _standalone(_connection: Any) -> None:
    """Nothing to reset: every statement of the fast paths ran alone in autocommit (asyncpg's
    default reset would cost a round trip per statement)."""
