"""billing.realtime on its own: publishing inside transactions, the hub's reads and de-duplication."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager, suppress
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import update

from billing.access import AccessPolicy, SubscriptionState
from billing.plans import load_catalog
from billing.realtime import CHANNEL, LocalBroadcast, Realtime, publish_account_change
from db.engine import Database
from db.enums import SubscriptionStatus, Tier
from db.migrate import upgrade
from db.models import account_table
from tests.billing_flows import account
from tests.conftest import PG_HOST, PG_PORT, PG_USER, DbTarget
from tests.graphql_support import insert_account

WAIT = 10.0
QUIET = 0.5


def policy() -> AccessPolicy:
    return AccessPolicy(catalog=load_catalog(), past_due_grace=timedelta(days=7))


@asynccontextmanager
async def running(database: Database) -> AsyncIterator[Realtime]:
    realtime = Realtime.for_database(database, policy())
    await realtime.start()
    try:
        yield realtime
    finally:
        await realtime.stop()


async def next_of(states: AsyncGenerator[SubscriptionState, None], within: float = WAIT) -> SubscriptionState:
    return await asyncio.wait_for(anext(states), within)


async def nothing_from(states: AsyncGenerator[SubscriptionState, None]) -> None:
    """Nothing is yielded for a while (the pending `anext` is cancelled, which ends the generator)."""
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(anext(states), QUIET)


async def write_state(database: Database, user_id: str, *, publish: bool = True, **values: Any) -> int:
    """Update the account as the sync does: the change and its announcement in one transaction."""
    row = await account(database, user_id)
    async with database.write() as conn:
        if values:
            await conn.execute(update(account_table).where(account_table.c.id == row.id).values(**values))
        if publish:
            await publish_account_change(conn, database, row.id)
    return int(row.id)


async def test_a_watch_yields_the_state_then_each_committed_change_once(database: Database) -> None:
    async with running(database) as realtime:
        states = realtime.hub.watch("hub-ada")
        first = await next_of(states)
        assert first.status is SubscriptionStatus.NONE and first.tier is Tier.NONE

        await insert_account(database, "hub-ada", status="trialing", tier="starter")
        await write_state(database, "hub-ada")  # an account the hub did not know: found by its id
        trialing = await next_of(states)
        assert trialing.status is SubscriptionStatus.TRIALING and trialing.tier is Tier.STARTER

        await write_state(database, "hub-ada")  # announced, but nothing changed: not sent again
        await write_state(database, "hub-ada", email="new@example.test")  # not part of what is sent
        await nothing_from(states)  # (which ends this watch)

        again = realtime.hub.watch("hub-ada")  # a new watch starts with the current state
        assert (await next_of(again)).status is SubscriptionStatus.TRIALING
        await write_state(database, "hub-ada", status="active", tier="pro")
        active = await next_of(again)
        assert active.status is SubscriptionStatus.ACTIVE and active.tier is Tier.PRO
        await again.aclose()
        assert realtime.hub.watcher_count == 0


async def test_every_watcher_of_a_user_gets_the_change_and_others_nothing(database: Database) -> None:
    await insert_account(database, "hub-one", status="active", tier="starter")
    await insert_account(database, "hub-two", status="active", tier="starter")
    async with running(database) as realtime:
        tab1, tab2 = realtime.hub.watch("hub-one"), realtime.hub.watch("hub-one")
        other = realtime.hub.watch("hub-two")
        for states in (tab1, tab2, other):
            assert (await next_of(states)).tier is Tier.STARTER
        assert realtime.hub.watcher_count == 3

        await write_state(database, "hub-one", tier="pro")
        assert (await next_of(tab1)).tier is Tier.PRO
        assert (await next_of(tab2)).tier is Tier.PRO
        await nothing_from(other)

        await tab1.aclose()
        await tab2.aclose()
        assert realtime.hub.watcher_count == 0


async def test_stopping_ends_every_watch(database: Database) -> None:
    realtime = Realtime.for_database(database, policy())
    await realtime.start()
    states = realtime.hub.watch("hub-stop")
    await next_of(states)
    pending = asyncio.ensure_future(anext(states))
    await asyncio.sleep(0.05)
    await realtime.stop()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(pending, WAIT)


async def test_a_rolled_back_write_announces_nothing(database: Database) -> None:
    await insert_account(database, "hub-rollback", status="active", tier="starter")
    row = await account(database, "hub-rollback")
    heard: asyncio.Queue[int] = asyncio.Queue()

    async def write(fail: bool) -> None:
        with suppress(RuntimeError):
            async with database.write() as conn:
                await publish_account_change(conn, database, row.id)
                if fail:
                    raise RuntimeError("the sync failed after writing")

    if database.is_postgres:
        listener = await asyncpg.connect(
            host=PG_HOST, port=PG_PORT, user=PG_USER, database=_pg_name(database)
        )
        await listener.add_listener(CHANNEL, lambda _c, _p, _ch, payload: heard.put_nowait(int(payload)))
        try:
            await write(fail=True)
            await asyncio.sleep(QUIET)
            assert heard.empty()
            await write(fail=False)
            assert await asyncio.wait_for(heard.get(), WAIT) == row.id
        finally:
            await listener.close()
        return

    broadcast = LocalBroadcast.of(database)

    def callback(account_ids: set[int]) -> None:
        for account_id in account_ids:
            heard.put_nowait(account_id)

    broadcast.subscribe(callback)
    try:
        await write(fail=True)
        assert heard.empty()
        await write(fail=False)
        assert heard.get_nowait() == row.id  # announced as soon as the connection is returned
        assert heard.empty()
    finally:
        broadcast.unsubscribe(callback)
    async with database.write() as conn:  # nobody subscribed: nothing is recorded
        await publish_account_change(conn, database, row.id)
    assert heard.empty()


def _pg_name(database: Database) -> str:
    name = database.engine.url.database
    assert name is not None
    return name


async def test_sqlite_notices_writes_by_other_processes(tmp_path: Path) -> None:
    """A write that announces nothing (another process: the CLI) is found by PRAGMA data_version."""
    path = tmp_path / "billing.db"
    url = f"sqlite+aiosqlite:///{path}"
    await asyncio.to_thread(upgrade, url)
    database = Database.from_url(url)
    try:
        await insert_account(database, "hub-cli", status="active", tier="starter")
        async with running(database) as realtime:
            states = realtime.hub.watch("hub-cli")
            assert (await next_of(states)).tier is Tier.STARTER

            def other_process_writes() -> None:
                with sqlite3.connect(path, timeout=10) as conn:
                    conn.execute("UPDATE billing_account SET tier = 'pro' WHERE user_id = 'hub-cli'")

            await asyncio.to_thread(other_process_writes)
            assert (await next_of(states, 2.0)).tier is Tier.PRO  # polled every 0.5 s
            assert realtime.hub.resyncs >= 1
            await states.aclose()
    finally:
        await database.dispose()


@pytest.mark.postgres_only
async def test_postgres_announces_to_every_listener_on_commit(
    database: Database, migrated_db: DbTarget
) -> None:
    """Two hubs (as two processes) on one database: a write through either reaches both."""
    await insert_account(database, "hub-pg", status="active", tier="starter")
    other_database = migrated_db.database()
    try:
        async with running(database) as here, running(other_database) as there:
            for realtime in (here, there):
                listener = realtime.listener
                assert listener is not None
                await asyncio.wait_for(listener.connected.wait(), WAIT)
            mine, theirs = here.hub.watch("hub-pg"), there.hub.watch("hub-pg")
            assert (await next_of(mine)).tier is Tier.STARTER
            assert (await next_of(theirs)).tier is Tier.STARTER
            await write_state(database, "hub-pg", tier="pro")
            assert (await next_of(mine)).tier is Tier.PRO
            assert (await next_of(theirs)).tier is Tier.PRO
            await mine.aclose()
            await theirs.aclose()
    finally:
        await other_database.dispose()
