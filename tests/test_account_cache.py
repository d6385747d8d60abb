"""billing/account_cache.py: account states served between requests, and never older than the
last notification a process has received.

The cache's own rules first (a fake database, a fake clock), then a whole service on PostgreSQL
with writers on other connections: migration 0013's trigger, the sync's own notification, a write
nobody announces, a killed LISTEN connection.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import httpx
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import text, update

from billing.access import AccessPolicy
from billing.account_cache import AccountCache, account_cache
from billing.plans import load_catalog
from billing.realtime import LocalChanges, Realtime, publish_account_change
from billing.settings import Settings
from db.engine import Database
from db.enums import SubscriptionStatus
from db.models import account_table
from tests.conftest import DbTarget, Service, running_service
from tests.graphql_support import hs256_token, insert_account
from tests.realtime_support import terminate_backend

WAIT = 10.0
QUERY = "{ viewer { email subscription { status tier } } }"


# The cache's rules -----------------------------------------------------------------------------


class FakeDatabase:
    """`load_subscription` reads through `first`: an owner without an account, counted, and held
    at `gate` when one is set."""

    def __init__(self) -> None:
        self.reads = 0
        self.gate: asyncio.Event | None = None
        self.reading = asyncio.Event()

    async def first(self, _statement: Any, _params: Any) -> None:
        self.reads += 1
        self.reading.set()
        if self.gate is not None:
            await self.gate.wait()
        return None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def live_cache(clock: Clock | None = None, seconds: float = 10.0) -> AccountCache:
    cache = AccountCache(seconds=seconds, monotonic=clock or Clock())
    cache.connected()
    return cache


async def load(cache: AccountCache, db: FakeDatabase, owner: str = "ann") -> SubscriptionStatus:
    return (await cache.load(cast(Database, db), owner)).status


async def test_a_state_is_read_once_then_served() -> None:
    cache, db = live_cache(), FakeDatabase()
    assert await load(cache, db) is SubscriptionStatus.NONE
    assert await load(cache, db) is SubscriptionStatus.NONE
    assert db.reads == 1
    await load(cache, db, "bob")
    assert db.reads == 2


async def test_a_new_account_drops_what_was_remembered_as_having_none() -> None:
    cache, db = live_cache(), FakeDatabase()
    await load(cache, db)
    cache.accounts_changed([42])  # an account the cache knows nothing of: perhaps ann's new one
    await load(cache, db)
    assert db.reads == 2


async def read_while(cache: AccountCache, db: FakeDatabase, meanwhile: Callable[[], None]) -> None:
    """A load whose read is held until `meanwhile` has run, then one more load."""
    db.gate = asyncio.Event()
    reading = asyncio.create_task(load(cache, db))
    await db.reading.wait()
    meanwhile()
    db.gate.set()
    await reading
    db.gate = None
    await load(cache, db)


async def test_a_read_overtaken_by_a_notification_is_not_kept() -> None:
    cache, db = live_cache(), FakeDatabase()
    # A change committed while the read was on its way: what it read may be older.
    await read_while(cache, db, lambda: cache.accounts_changed([7]))
    assert db.reads == 2


async def test_nothing_is_served_or_kept_while_listen_is_down() -> None:
    cache, db = live_cache(), FakeDatabase()
    await load(cache, db)
    cache.disconnected()
    assert not cache.live
    await load(cache, db)
    await load(cache, db)
    assert db.reads == 3
    cache.connected()
    await load(cache, db)
    await load(cache, db)
    assert db.reads == 4


async def test_a_read_that_straddles_a_reconnection_is_not_kept() -> None:
    cache, db = live_cache(), FakeDatabase()

    def reconnect() -> None:
        cache.disconnected()  # notifications may have been missed from here ...
        cache.connected()  # ... until here

    await read_while(cache, db, reconnect)
    assert db.reads == 2


async def test_an_entry_expires_after_the_configured_seconds() -> None:
    clock = Clock()
    cache, db = live_cache(clock, seconds=5), FakeDatabase()
    await load(cache, db)
    clock.now += 4.9
    await load(cache, db)
    assert db.reads == 1
    clock.now += 0.2
    await load(cache, db)
    assert db.reads == 2


async def test_a_full_cache_starts_over() -> None:
    cache, db = AccountCache(seconds=10, max_entries=3, monotonic=Clock()), FakeDatabase()
    cache.connected()
    for owner in ("a", "b", "c", "d"):
        await load(cache, db, owner)
    await load(cache, db, "d")
    await load(cache, db, "a")
    assert db.reads == 5  # "d" was kept after the clear, "a" was not


def test_only_postgresql_with_fast_paths_and_seconds_above_zero_gets_a_cache() -> None:
    pg = cast(Database, type("Pg", (), {"is_postgres": True})())
    sqlite = cast(Database, type("Lite", (), {"is_postgres": False})())
    assert account_cache(pg, Settings(fast_paths=True, account_cache_seconds=10)) is not None
    assert account_cache(sqlite, Settings(fast_paths=True, account_cache_seconds=10)) is None
    assert account_cache(pg, Settings(fast_paths=False, account_cache_seconds=10)) is None
    assert account_cache(pg, Settings(fast_paths=True, account_cache_seconds=0)) is None


# A whole service on PostgreSQL -----------------------------------------------------------------


def hits() -> float:
    return REGISTRY.get_sample_value("billing_account_cache_lookups_total", {"result": "hit"}) or 0.0


@pytest.fixture
async def cached(database: Database, sandbox_db: DbTarget) -> AsyncIterator[Service]:
    async with running_service(database, sandbox_db, fast_paths=True, account_cache_seconds=60) as service:
        await wait_until(lambda: service.app.state.graphql.accounts.live)
        yield service


@pytest.fixture
async def other_process(migrated_db: DbTarget) -> AsyncIterator[Database]:
    """The same database through another engine: its commits reach the service only through
    PostgreSQL's notifications, as another process's would."""
    other = migrated_db.database()
    try:
        yield other
    finally:
        await other.dispose()


async def wait_until(condition: Any) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def viewer(client: httpx.AsyncClient, service: Service, user_id: str) -> dict[str, Any]:
    answer = await client.post(
        f"{service.url}/graphql",
        json={"query": QUERY},
        headers={"Authorization": f"Bearer {hs256_token(user_id)}"},
    )
    body = answer.json()
    assert "errors" not in body, body
    return cast(dict[str, Any], body["data"]["viewer"])


async def set_email(database: Database, user_id: str, email: str, *, announce: bool = True) -> None:
    """A write as an operator's SQL would make it; `announce=False` skips the trigger (replica mode)."""
    async with database.write() as conn:
        if not announce:
            await conn.execute(text("SET LOCAL session_replication_role = replica"))
        await conn.execute(
            update(account_table).where(account_table.c.user_id == user_id).values(email=email)
        )


async def write_as_the_sync(database: Database, user_id: str, email: str) -> None:
    """A change announced in its transaction as `billing.sync` announces it, with the trigger
    skipped (replica mode): only the explicit announcement tells anyone."""
    async with database.write() as conn:
        await conn.execute(text("SET LOCAL session_replication_role = replica"))
        account_id = (
            await conn.execute(
                update(account_table)
                .where(account_table.c.user_id == user_id)
                .values(email=email)
                .returning(account_table.c.id)
            )
        ).scalar_one()
        await publish_account_change(conn, database, account_id)


@pytest.mark.postgres_only
async def test_no_answer_is_older_than_the_last_notification_received(
    cached: Service, other_process: Database
) -> None:
    """Readers hammer one process while another connection commits 25 changes: every answer to a
    request sent after the process heard of change i shows change i or a later one."""
    service = cached
    cache = service.app.state.graphql.accounts
    await insert_account(service.database, "cache-ann", email="v0@example.test")
    heard: list[tuple[float, int]] = []  # (when the process had heard of change i, i)
    answers: list[tuple[float, int]] = []  # (when the request was sent, the version it showed)
    hits_before = hits()
    done = asyncio.Event()

    async def reader(client: httpx.AsyncClient) -> None:
        while not done.is_set():
            sent = time.monotonic()
            email = (await viewer(client, service, "cache-ann"))["email"]
            answers.append((sent, int(email.split("@")[0][1:])))

    async with httpx.AsyncClient(timeout=WAIT) as client:
        readers = [asyncio.create_task(reader(client)) for _ in range(4)]
        await asyncio.sleep(0.2)
        for version in range(1, 26):
            seen = cache.notifications
            await set_email(other_process, "cache-ann", f"v{version}@example.test")
            await wait_until(lambda seen=seen: cache.notifications > seen)
            heard.append((time.monotonic(), version))
            await asyncio.sleep(random.uniform(0, 0.03))
        await asyncio.sleep(0.1)
        done.set()
        await asyncio.gather(*readers)

    assert hits() - hits_before > 50, "the answers were not served from the cache: this proves nothing"
    for at, version in heard:
        stale = [(sent, shown) for sent, shown in answers if sent >= at and shown < version]
        assert not stale, f"sent after change {version} was heard of, answered with {stale[:3]}"
    assert answers[-1][1] == 25


@pytest.mark.postgres_only
async def test_a_change_this_process_writes_is_read_back_at_once(cached: Service) -> None:
    """The sync's own commit drops the entry before its writer goes on (no wait for PostgreSQL)."""
    service = cached
    await insert_account(service.database, "cache-bob", email="old@example.test")
    async with httpx.AsyncClient(timeout=WAIT) as client:
        assert (await viewer(client, service, "cache-bob"))["email"] == "old@example.test"
        await write_as_the_sync(service.database, "cache-bob", "new@example.test")
        assert (await viewer(client, service, "cache-bob"))["email"] == "new@example.test"


@pytest.mark.postgres_only
async def test_this_process_s_commit_drops_the_entry_before_the_writer_goes_on(database: Database) -> None:
    """Without PostgreSQL's notification (no LISTEN here, the trigger skipped), only the commit
    announced in process (billing.realtime.LocalChanges) can drop the entry."""
    cache = AccountCache(seconds=60)
    realtime = Realtime.for_database(
        database, AccessPolicy.from_settings(load_catalog(), Settings()), cache=cache
    )
    local = next(source for source in realtime.sources if isinstance(source, LocalChanges))
    await local.start()
    try:
        cache.connected()
        await insert_account(database, "cache-ed", email="old@example.test")
        assert (await cache.load(database, "cache-ed")).email == "old@example.test"
        await write_as_the_sync(database, "cache-ed", "new@example.test")
        assert (await cache.load(database, "cache-ed")).email == "new@example.test"
    finally:
        await local.stop()


@pytest.mark.postgres_only
async def test_an_unannounced_write_is_served_stale_until_the_listen_connection_is_lost(
    cached: Service, other_process: Database
) -> None:
    """What the cache relies on, shown: a write that notifies nobody is not seen (so the cache
    does serve), and a lost LISTEN connection empties the cache."""
    service = cached
    cache = service.app.state.graphql.accounts
    listener = service.app.state.realtime.listener
    await insert_account(service.database, "cache-cy", email="old@example.test")
    async with httpx.AsyncClient(timeout=WAIT) as client:
        assert (await viewer(client, service, "cache-cy"))["email"] == "old@example.test"
        await set_email(other_process, "cache-cy", "new@example.test", announce=False)
        await asyncio.sleep(0.3)
        assert (await viewer(client, service, "cache-cy"))["email"] == "old@example.test"

        await terminate_backend(listener.pid)
        await wait_until(lambda: listener.connections >= 2 and cache.live)
        assert (await viewer(client, service, "cache-cy"))["email"] == "new@example.test"


@pytest.mark.postgres_only
async def test_an_unannounced_write_is_seen_once_its_entry_expires(
    database: Database, sandbox_db: DbTarget, other_process: Database
) -> None:
    async with running_service(database, sandbox_db, fast_paths=True, account_cache_seconds=0.5) as service:
        await wait_until(lambda: service.app.state.graphql.accounts.live)
        await insert_account(database, "cache-di", email="old@example.test")
        async with httpx.AsyncClient(timeout=WAIT) as client:
            assert (await viewer(client, service, "cache-di"))["email"] == "old@example.test"
            await set_email(other_process, "cache-di", "new@example.test", announce=False)
            assert (await viewer(client, service, "cache-di"))["email"] == "old@example.test"
            await asyncio.sleep(0.6)
            assert (await viewer(client, service, "cache-di"))["email"] == "new@example.test"
