"""Operating the host-event outbox: list events, replay them, count them (metrics)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update

from billing.host_events.delivery import enable_endpoint
from db.engine import Database
from db.models import HostEventStatus, host_endpoint_table, host_event_table


@dataclass(frozen=True)
class HostEventRow:
    id: int
    message_id: str
    type: str
    user_id: str | None
    status: str
    attempts: int
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    next_attempt_at: datetime | None
    delivered_at: datetime | None


@dataclass(frozen=True)
class EndpointState:
    url: str
    disabled_at: datetime | None
    disabled_reason: str | None


async def list_events(
    database: Database, *, failed: bool = False, limit: int = 100, where: Any = None
) -> list[HostEventRow]:
    """The newest events (or the failed ones, or those matching `where`), newest first."""
    t = host_event_table.c
    query = select(
        t.id,
        t.message_id,
        t.type,
        t.user_id,
        t.status,
        t.attempts,
        t.last_status_code,
        t.last_error,
        t.created_at,
        t.next_attempt_at,
        t.delivered_at,
    )
    if failed:
        query = query.where(t.status == HostEventStatus.FAILED.value)
    if where is not None:
        query = query.where(where)
    async with database.read() as conn:
        rows = await conn.execute(query.order_by(t.id.desc()).limit(limit))
        return [HostEventRow(**row._mapping) for row in rows]


async def endpoint_state(database: Database, url: str) -> EndpointState:
    e = host_endpoint_table.c
    async with database.read() as conn:
        row = (await conn.execute(select(e.disabled_at, e.disabled_reason).where(e.url == url))).first()
    if row is None:
        return EndpointState(url, None, None)
    return EndpointState(url, row.disabled_at, row.disabled_reason)


def _selector(event: str | None, failed: bool) -> Any:
    t = host_event_table.c
    if event is not None:
        return t.id == int(event) if event.isdigit() else t.message_id == event
    if failed:
        return t.status == HostEventStatus.FAILED.value
    return None


async def replay(
    database: Database,
    *,
    event: str | None = None,
    failed: bool = False,
    url: str | None = None,
    now: datetime,
    dry_run: bool = False,
) -> list[HostEventRow]:
    """Make events due again (one by id or `webhook-id`, or every failed one), with a fresh
    attempt count, and enable the endpoint again (after a 410). Returns the events replayed
    (with `dry_run`, the ones that would be, and nothing changes)."""
    condition = _selector(event, failed)
    if condition is None:
        return []
    t = host_event_table.c
    chosen = await list_events(database, where=condition, limit=1_000_000)
    ids = [row.id for row in chosen]
    if not ids or dry_run:
        return chosen
    async with database.write() as conn:
        await conn.execute(
            update(host_event_table)
            .where(t.id.in_(ids))
            .values(
                status=HostEventStatus.PENDING.value,
                attempts=0,
                next_attempt_at=now,
                lease_expires_at=None,
                delivered_at=None,
            )
        )
        if url is not None:
            await enable_endpoint(conn, database, url, now=now)
    return chosen


async def counts(database: Database) -> dict[str, int]:
    """Events by status (for metrics: pending and failed)."""
    t = host_event_table.c
    async with database.read() as conn:
        rows = await conn.execute(select(t.status, func.count()).group_by(t.status))
        found = {status: int(count) for status, count in rows}
    return {status.value: found.get(status.value, 0) for status in HostEventStatus}
