"""Every row of the service's tables, to prove that a refused or failed call wrote nothing.

    before = await snapshot(database)
    ...  # the call that must leave the database alone
    assert await snapshot(database) == before

or, with the difference spelled out when it fails:

    async with unchanged(database):
        ...

The default is every table of `db.models` except `rate_limit` (it counts requests, which a
refused mutation still is); pass `tables` to look at fewer, e.g. while webhooks of unrelated
customers may still be landing in `stripe_event`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import Table, select

from db.engine import Database
from db.models import metadata, rate_limit_table

Snapshot = dict[str, list[tuple[Any, ...]]]

STATE_TABLES: tuple[Table, ...] = tuple(
    table for table in metadata.sorted_tables if table.name != rate_limit_table.name
)


async def snapshot(database: Database, tables: Iterable[Table] = STATE_TABLES) -> Snapshot:
    """Every row of `tables` (by name), in a stable order."""
    found: Snapshot = {}
    async with database.read() as conn:
        for table in tables:
            rows = (await conn.execute(select(table))).all()
            found[table.name] = sorted((tuple(row) for row in rows), key=repr)
    return found


def difference(before: Snapshot, after: Snapshot) -> dict[str, dict[str, list[tuple[Any, ...]]]]:
    """Per table, the rows that appeared and the rows that went (changed rows show as both)."""
    changed: dict[str, dict[str, list[tuple[Any, ...]]]] = {}
    for name in sorted(set(before) | set(after)):
        old, new = before.get(name, []), after.get(name, [])
        added = [row for row in new if row not in old]
        removed = [row for row in old if row not in new]
        if added or removed:
            changed[name] = {"added": added, "removed": removed}
    return changed


@asynccontextmanager
async def unchanged(database: Database, tables: Iterable[Table] = STATE_TABLES) -> AsyncIterator[Snapshot]:
    """Fail, naming the rows, if the block changes any row of `tables`; yields the snapshot."""
    chosen = tuple(tables)
    before = await snapshot(database, chosen)
    yield before
    after = await snapshot(database, chosen)
    assert after == before, f"database changed: {difference(before, after)}"
