"""Rows of work claimed with a lease: the one mechanism behind the background workers.

Anything that must happen after a commit (applying a webhook, reporting usage to a meter) is a
row written in the same transaction as its cause, in a table with `status`, `attempts`,
`next_attempt_at`, `lease_expires_at` and `last_error`. A row is due when it waits and its time
has come, or when it was claimed and its lease ran out (the process holding it died or lost its
connection). A claim moves due rows to the claimed status with `attempts + 1` and a lease, in
one short transaction (`FOR UPDATE SKIP LOCKED` on PostgreSQL, so several processes claim
disjoint rows; SQLite has one writer). The work itself runs outside any transaction; its
outcome is written afterwards, and a failure waits `backoff(attempts)` before the next try.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Row, Table, and_, or_, select, update

from db.engine import Database

log = logging.getLogger("billing.work_queue")

MAX_BACKOFF_SECONDS = 600
MAX_ERROR_LENGTH = 2000


def backoff(attempts: int) -> timedelta:
    """1 s, 2 s, 4 s ... capped at 10 minutes."""
    return timedelta(seconds=min(2 ** max(attempts - 1, 0), MAX_BACKOFF_SECONDS))


@dataclass(frozen=True)
class LeasedQueue:
    """One table of work rows: which statuses mean waiting and claimed, and how long a lease is."""

    table: Table
    waiting: str
    claimed: str
    lease: timedelta

    def due(self, now: datetime) -> ColumnElement[bool]:
        c = self.table.c
        return or_(
            and_(c.status == self.waiting, c.next_attempt_at <= now),
            and_(c.status == self.claimed, c.lease_expires_at < now),
        )

    async def claim(
        self,
        database: Database,
        *,
        now: datetime,
        limit: int,
        order_by: Sequence[ColumnElement[Any]],
        returning: Sequence[ColumnElement[Any]],
        where: ColumnElement[bool] | None = None,
    ) -> list[Row[Any]]:
        """Claim up to `limit` due rows with a lease; their `returning` columns, claimed.

        `where` narrows the due rows further (the host-event worker: an account's oldest only).
        """
        c = self.table.c
        condition = self.due(now) if where is None else and_(self.due(now), where)
        query = select(c.id).where(condition).order_by(*order_by).limit(limit)
        if database.is_sqlite:
            # An idle poll must not take SQLite's one write lock: look first, in a read.
            async with database.read() as conn:
                if (await conn.execute(query.limit(1))).first() is None:
                    return []
        if database.is_postgres:
            query = query.with_for_update(skip_locked=True)
        async with database.write() as conn:
            ids = list((await conn.execute(query)).scalars())
            if not ids:
                return []
            rows = await conn.execute(
                update(self.table)
                .where(c.id.in_(ids))
                .values(status=self.claimed, lease_expires_at=now + self.lease, attempts=c.attempts + 1)
                .returning(*returning)
            )
            return list(rows)

    async def release(self, database: Database, claims: Sequence[tuple[Any, int]], *, now: datetime) -> None:
        """Give back rows claimed as (id, attempts) and not finished, e.g. when the process stops
        (SIGTERM): waiting and due now, the attempt not counted. A row finished, or claimed again
        by another process after the lease ran out, is left alone."""
        c = self.table.c
        async with database.write() as conn:
            for row_id, attempts in claims:
                await conn.execute(
                    update(self.table)
                    .where(c.id == row_id, c.status == self.claimed, c.attempts == attempts)
                    .values(
                        status=self.waiting, lease_expires_at=None, next_attempt_at=now, attempts=attempts - 1
                    )
                )

    def retry_later(self, *, attempts: int, now: datetime, error: str | None) -> dict[str, Any]:
        """The values that put a claimed row back to wait `backoff(attempts)` (with `error`,
        else keeping the last one)."""
        return self.retry_at(now + backoff(attempts), error=error)

    def retry_at(self, when: datetime, *, error: str | None) -> dict[str, Any]:
        """The values that put a claimed row back to wait until `when` (a schedule of its own)."""
        values: dict[str, Any] = {
            "status": self.waiting,
            "lease_expires_at": None,
            "next_attempt_at": when,
        }
        if error is not None:
            values["last_error"] = error[:MAX_ERROR_LENGTH]
        return values

    def settle(self, status: str, *, error: str | None = None, **more: Any) -> dict[str, Any]:
        """The values of a row done with (`status` is final): no lease, no next attempt."""
        return {
            "status": status,
            "lease_expires_at": None,
            "next_attempt_at": None,
            "last_error": None if error is None else error[:MAX_ERROR_LENGTH],
            **more,
        }


async def release_on_shutdown(
    queue: LeasedQueue, database: Database, claims: Sequence[tuple[Any, int]], clock: Callable[[], datetime]
) -> None:
    """`queue.release`, from a task being cancelled; a failure only leaves the lease to expire."""
    try:
        await queue.release(database, claims, now=clock())
    except Exception:
        log.exception("could not give back %d claimed row(s); their lease will expire", len(claims))
