"""One-row reads run by asyncpg itself, on a connection of the SQLAlchemy pool (`FAST_PATHS`).

SQLAlchemy's execution of a small read (a checkout with an isolation switch, an execution
context, a result object, in greenlets) costs about as much CPU as the rest of the viewer
query's database work (bench/RESULTS.md, fix 9). Here a select is compiled once for the
engine's dialect and run by asyncpg's `fetchrow`, with the bind and result processors
SQLAlchemy would apply to each parameter and column (UTC datetimes in and out), outside any
transaction, as `Database.read()` reads.

What it relies on beyond SQLAlchemy's everyday API (pinned below its next minor version in
pyproject.toml; `tests/test_pinned_internals.py` fails when it changes): the compiled
statement's `positiontup`, `binds`, `literal_execute_params` and `post_compile_params`, an
insert's `_returning` (its public `exported_columns` can be stale: `.returning()` copies the
statement with that property already computed), and the engine's
`dispatch.before_cursor_execute` listener collection.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Insert, Select
from sqlalchemy.ext.asyncio import AsyncEngine

MAX_STATEMENTS = 64  # distinct statements compiled and kept; the service reads a handful

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
        values = insert.values(parameters)
        async with self.engine.connect() as conn:
            connection = await conn.get_raw_connection()
            try:
                status = await connection.driver_connection.execute(insert.sql, *values)  # type: ignore[union-attr]
            except Exception:
                await conn.invalidate()
                raise
        return int(status.rsplit(" ", 1)[-1])

    async def first(self, read: CompiledRead, parameters: Mapping[str, Any]) -> dict[str, Any] | None:
        values = read.values(parameters)
        async with self.engine.connect() as conn:
            connection = await conn.get_raw_connection()
            try:
                record = await connection.driver_connection.fetchrow(read.sql, *values)  # type: ignore[union-attr]
            except Exception:
                # As SQLAlchemy would on a lost connection: never hand this one out again.
                await conn.invalidate()
                raise
        return None if record is None else read.row(record)
