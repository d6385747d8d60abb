"""One sync per customer at a time (billing/sync.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy import text

from billing.host_events.events import HostEventConfig
from db.engine import Database


class CustomerLocks:
    """Serialises syncs of one customer, so a slow, older fetch never overwrites a newer one.

    PostgreSQL: a session-level advisory lock on a connection in autocommit mode, so it spans
    the Stripe call without an open transaction, and holds across processes. SQLite (one
    service process): an asyncio lock per customer.

    One per process, shared by every path that syncs (webhooks, mutations, CLI): it also
    carries the process's `host_events` configuration, so every sync that changes an account
    writes its host events, whichever path ran it.
    """

    def __init__(self, database: Database, *, host_events: HostEventConfig | None = None) -> None:
        self.database = database
        self.host_events = host_events
        self._local: dict[str, asyncio.Lock] = {}

    @asynccontextmanager
    async def hold(self, customer_id: str) -> AsyncIterator[None]:
        if not self.database.is_postgres:
            lock = self._local.setdefault(customer_id, asyncio.Lock())
            async with lock:
                yield
            return
        async with self.database.engine.connect() as conn:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            key = {"key": f"billing.customer:{customer_id}"}
            await conn.execute(text("SELECT pg_advisory_lock(hashtextextended(:key, 0))"), key)
            try:
                yield
            finally:
                await conn.execute(text("SELECT pg_advisory_unlock(hashtextextended(:key, 0))"), key)
