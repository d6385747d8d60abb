"""Real-time billing state: who watches whose subscription, and telling them when it changes.

A write of an account's subscription state (`billing.sync`, the one place that writes
it) calls `publish_account_change` inside its transaction. The notification carries only the
account id: whoever receives it reads the state from the database, so it never carries data to
the wrong user, nor a state older than the database's.

- PostgreSQL: `pg_notify('billing_account_changed', '<account id>')` in the writing transaction,
  which PostgreSQL delivers on commit only (never for a rollback), to every service process.
  Each process holds one dedicated asyncpg connection, outside the SQLAlchemy pool, that LISTENs
  (`PostgresListener`). When it dies (asyncpg's termination listener, or a failed health check)
  it reconnects with backoff and then re-reads the state of every watched user, so a change
  made while it was away is not lost.
- SQLite (one service process): the id is recorded on the writing connection and announced to
  this process's hubs once the transaction commits (`LocalBroadcast`). Writes by other processes
  (the CLI's `billing sync`, `billing events replay`) are noticed by polling `PRAGMA
  data_version` on a dedicated connection (`DataVersionPoller`), which re-reads every watched
  user's state.

`BillingStateHub` holds the watchers of one process. One task reads states (in one query per
batch of changes, in order, so a watcher never receives an older state after a newer one) and
hands each watcher the newest; a watcher yields a state only when it differs from the last one
it yielded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, TypeVar

import aiosqlite
import asyncpg  # type: ignore[import-untyped]
from sqlalchemy import event, select, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.pool import ConnectionPoolEntry

from billing.access import AccessPolicy, SubscriptionState, account_states
from billing.account_cache import AccountCache
from billing.clock import Clock, utcnow
from billing.metrics import REALTIME_SUBSCRIPTIONS
from db.engine import Database
from db.enums import Tier
from db.models import account_table

log = logging.getLogger("billing.realtime")
T = TypeVar("T")

CHANNEL = "billing_account_changed"
LISTENER_APPLICATION_NAME = "billing-realtime"
# Ids per `IN (...)` query: well below SQLite's and asyncpg's parameter limits.
QUERY_CHUNK = 500


# Publishing -----------------------------------------------------------------------------------


async def publish_account_change(conn: AsyncConnection, database: Database, account_id: int) -> None:
    """Announce that the account's subscription state changed, once `conn`'s transaction commits.

    Call it inside the writing transaction. Nothing is announced if the transaction rolls back.
    """
    if database.is_postgres:
        await conn.execute(
            text("SELECT pg_notify(:channel, :payload)"), {"channel": CHANNEL, "payload": str(account_id)}
        )
    broadcast = LocalBroadcast.existing(database)
    if broadcast is not None:  # None: nobody listens in this process (the CLI); other processes are told
        broadcast.record(conn, account_id)


_PENDING = "billing.realtime.pending"  # written in the open transaction
_COMMITTED = "billing.realtime.committed"  # committed, announced when the connection is returned


class LocalBroadcast:
    """In process: account ids written on an engine, announced after their commit.

    The ids ride on the pooled connection's `info`: moved aside when the transaction commits,
    dropped when it rolls back, and announced when the connection goes back to the pool, after
    the commit, so a listener that reads the state at once sees the new one.
    """

    _registry: ClassVar[weakref.WeakKeyDictionary[Engine, LocalBroadcast]] = weakref.WeakKeyDictionary()

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._callbacks: list[Callable[[set[int]], None]] = []

    @classmethod
    def of(cls, database: Database) -> LocalBroadcast:
        engine = database.engine.sync_engine
        broadcast = cls._registry.get(engine)
        if broadcast is None:
            broadcast = cls._registry[engine] = cls(engine)
        return broadcast

    @classmethod
    def existing(cls, database: Database) -> LocalBroadcast | None:
        broadcast = cls._registry.get(database.engine.sync_engine)
        return broadcast if broadcast is not None and broadcast._callbacks else None

    def subscribe(self, callback: Callable[[set[int]], None]) -> None:
        if not self._callbacks:
            event.listen(self.engine, "commit", self._on_commit)
            event.listen(self.engine, "rollback", self._on_rollback)
            event.listen(self.engine.pool, "checkin", self._on_checkin)
        self._callbacks.append(callback)

    def unsubscribe(self, callback: Callable[[set[int]], None]) -> None:
        if callback in self._callbacks:
            self._callbacks.remove(callback)
        if not self._callbacks:
            for target, name, listener in (
                (self.engine, "commit", self._on_commit),
                (self.engine, "rollback", self._on_rollback),
                (self.engine.pool, "checkin", self._on_checkin),
            ):
                if event.contains(target, name, listener):
                    event.remove(target, name, listener)

    def record(self, conn: AsyncConnection, account_id: int) -> None:
        conn.info.setdefault(_PENDING, set()).add(account_id)

    def _on_commit(self, conn: Connection) -> None:
        pending = conn.info.pop(_PENDING, None)
        if pending:
            conn.info.setdefault(_COMMITTED, set()).update(pending)

    def _on_rollback(self, conn: Connection) -> None:
        conn.info.pop(_PENDING, None)

    def _on_checkin(self, _dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        record.info.pop(_PENDING, None)
        committed: set[int] | None = record.info.pop(_COMMITTED, None)
        if committed:
            for callback in list(self._callbacks):
                try:
                    callback(set(committed))
                except Exception:  # a broken listener must not break the writer
                    log.exception("real-time: in-process listener failed")


# The hub -------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Watcher:
    user_id: str
    latest: SubscriptionState | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)


_StateKey = tuple[tuple[tuple[str, Any], ...], Tier]
# Fields of SubscriptionState that are not part of what a watcher is sent.
_NOT_SENT = frozenset({"user_id", "email", "name", "account_id"})


class BillingStateHub:
    """The watchers of one process and the one task that reads their states.

    Tell it what changed with `accounts_changed(ids)` (a notification) or `resync()` (anything
    may have changed: re-read every watched user). `watch(user_id)` yields the user's state at
    once, then each state that differs from the last one it yielded.
    """

    def __init__(
        self,
        database: Database,
        policy: AccessPolicy,
        *,
        clock: Clock = utcnow,
        retry_delay: float = 0.5,
        max_retry_delay: float = 10.0,
    ) -> None:
        self.database = database
        self.policy = policy
        self.clock = clock
        self.retry_delay = retry_delay
        self.max_retry_delay = max_retry_delay
        self.reads = 0  # state queries run, for observability and tests
        self.resyncs = 0  # times every watched user was re-read
        self._watchers: dict[str, set[_Watcher]] = {}
        self._account_user: dict[int, str] = {}  # for watched users that have an account
        self._user_account: dict[str, int] = {}
        self._dirty_accounts: set[int] = set()
        self._dirty_users: set[str] = set()
        self._dirty_all = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    # Lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is None:
            self._closed = False
            self._task = asyncio.create_task(self._run(), name="billing-realtime-hub")

    async def stop(self) -> None:
        """End every watch (their streams complete) and the reading task."""
        self._closed = True
        for watchers in self._watchers.values():
            for watcher in watchers:
                watcher.wake.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    # Signals --------------------------------------------------------------------------------

    def accounts_changed(self, account_ids: Iterable[int]) -> None:
        self._dirty_accounts.update(account_ids)
        self._wake.set()

    def resync(self) -> None:
        """Re-read every watched user (a reconnect, or a write we cannot attribute)."""
        self._dirty_all = True
        self._wake.set()

    # Watching -------------------------------------------------------------------------------

    @property
    def watcher_count(self) -> int:
        return sum(len(watchers) for watchers in self._watchers.values())

    async def watch(self, user_id: str) -> AsyncGenerator[SubscriptionState, None]:
        """The user's state now, then every different one, until the consumer stops or the hub does."""
        if self._closed:
            return
        watcher = _Watcher(user_id)
        self._watchers.setdefault(user_id, set()).add(watcher)
        REALTIME_SUBSCRIPTIONS.inc()
        self._dirty_users.add(user_id)  # the first state comes through the reader too: in order
        self._wake.set()
        last: _StateKey | None = None
        try:
            while True:
                await watcher.wake.wait()
                watcher.wake.clear()
                if self._closed:
                    return
                state = watcher.latest
                if state is None:
                    continue
                key = self._key(state)
                if key != last:
                    last = key
                    yield state
        finally:
            REALTIME_SUBSCRIPTIONS.dec()
            self._forget(watcher)

    def _key(self, state: SubscriptionState) -> _StateKey:
        """What a watcher is sent: the subscription fields, and the tier they grant now."""
        fields = tuple(
            (f.name, getattr(state, f.name)) for f in dataclasses.fields(state) if f.name not in _NOT_SENT
        )
        return fields, self.policy.effective_tier(state, self.clock())

    def _forget(self, watcher: _Watcher) -> None:
        watchers = self._watchers.get(watcher.user_id)
        if watchers is None:
            return
        watchers.discard(watcher)
        if not watchers:
            del self._watchers[watcher.user_id]
            account_id = self._user_account.pop(watcher.user_id, None)
            if account_id is not None:
                self._account_user.pop(account_id, None)

    # Reading --------------------------------------------------------------------------------

    async def _run(self) -> None:
        delay = self.retry_delay
        while True:
            await self._wake.wait()
            self._wake.clear()
            accounts, users, everyone = self._dirty_accounts, self._dirty_users, self._dirty_all
            self._dirty_accounts, self._dirty_users, self._dirty_all = set(), set(), False
            try:
                await self._refresh(accounts, users, everyone)
            except Exception:
                log.exception("real-time: cannot read billing state; retrying in %.1f s", delay)
                self._dirty_accounts |= accounts
                self._dirty_users |= users
                self._dirty_all = self._dirty_all or everyone
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_retry_delay)
                self._wake.set()
            else:
                delay = self.retry_delay

    async def _refresh(self, accounts: set[int], users: set[str], everyone: bool) -> None:
        if everyone:
            self.resyncs += 1
            targets = set(self._watchers)
        else:
            targets = {user for user in users if user in self._watchers}
            unknown: list[int] = []
            for account_id in accounts:
                user = self._account_user.get(account_id)
                if user is not None:
                    targets.add(user)
                else:
                    unknown.append(account_id)
            # An account we do not know can only be a watched user's if one has no account yet.
            if unknown and any(user not in self._user_account for user in self._watchers):
                targets |= await self._owners(unknown) & set(self._watchers)
        if targets:
            states = await self._states(sorted(targets))
            for user_id, (state, owned) in states.items():
                self._offer(user_id, state, owned)

    async def _owners(self, account_ids: Sequence[int]) -> set[str]:
        owners: set[str] = set()
        async with self.database.read() as conn:
            for chunk in _chunks(sorted(account_ids)):
                query = select(account_table.c.user_id).where(account_table.c.id.in_(chunk))
                owners.update((await conn.execute(query)).scalars())
        return owners

    async def _states(self, user_ids: Sequence[str]) -> dict[str, tuple[SubscriptionState, int | None]]:
        """Each user's state and account id (None: no account), in one query per chunk."""
        states: dict[str, tuple[SubscriptionState, int | None]] = {
            user_id: (SubscriptionState(user_id=user_id), None) for user_id in user_ids
        }
        async with self.database.read() as conn:
            for chunk in _chunks(user_ids):
                self.reads += 1
                for user_id, state in (await account_states(conn, chunk)).items():
                    states[user_id] = (state, state.account_id)
        return states

    def _offer(self, user_id: str, state: SubscriptionState, account_id: int | None) -> None:
        watchers = self._watchers.get(user_id)
        if not watchers:
            return
        if account_id is not None:
            self._user_account[user_id] = account_id
            self._account_user[account_id] = user_id
        for watcher in watchers:
            watcher.latest = state
            watcher.wake.set()


def _chunks(items: Sequence[T]) -> Iterable[Sequence[T]]:
    for start in range(0, len(items), QUERY_CHUNK):
        yield items[start : start + QUERY_CHUNK]


# Change sources ------------------------------------------------------------------------------


class ChangeSource(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class ListenConnection(Protocol):
    """What `PostgresListener` uses of an asyncpg connection."""

    async def add_listener(self, channel: str, callback: Callable[..., None]) -> None: ...

    def add_termination_listener(self, callback: Callable[[Any], None]) -> None: ...

    def get_server_pid(self) -> int: ...

    async def fetchval(self, query: str) -> Any: ...

    def is_closed(self) -> bool: ...

    async def close(self) -> None: ...

    def terminate(self) -> None: ...


Connector = Callable[[], Awaitable[ListenConnection]]


def asyncpg_connector(
    database: Database, *, application_name: str = LISTENER_APPLICATION_NAME, timeout: float = 10.0
) -> Connector:
    """Connects to the database's PostgreSQL server with asyncpg, outside the SQLAlchemy pool."""
    _args, params = database.engine.dialect.create_connect_args(database.engine.url)

    async def connect() -> ListenConnection:
        connection: ListenConnection = await asyncpg.connect(
            **params, timeout=timeout, server_settings={"application_name": application_name}
        )
        return connection

    return connect


class PostgresListener:
    """The one LISTEN connection of a process, kept alive.

    Each notification's account id goes to `on_accounts`. After every (re)connection, once
    LISTEN is in place, `on_connected` runs (the hub re-reads every watched user): a change
    committed while the connection was down is read then, one committed later is notified.
    """

    def __init__(
        self,
        connect: Connector,
        on_accounts: Callable[[Iterable[int]], None],
        on_connected: Callable[[], None],
        *,
        on_disconnected: Callable[[], None] = lambda: None,
        channel: str = CHANNEL,
        min_backoff: float = 0.1,
        max_backoff: float = 5.0,
        health_interval: float = 15.0,
        health_timeout: float = 5.0,
        stable_after: float = 30.0,
    ) -> None:
        self.connect = connect
        self.on_accounts = on_accounts
        self.on_connected = on_connected
        self.on_disconnected = on_disconnected
        self.channel = channel
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.health_interval = health_interval
        self.health_timeout = health_timeout
        self.stable_after = stable_after
        self.pid: int | None = None  # the server process of the live connection
        self.connections = 0  # successful LISTENs, the first one included
        self.connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="billing-realtime-listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        delay = self.min_backoff
        while True:
            try:
                conn = await self.connect()
            except Exception as exc:
                log.warning("real-time: cannot connect to LISTEN (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_backoff)
                continue
            started = time.monotonic()
            try:
                await self._listen(conn)
            except Exception as exc:
                log.warning("real-time: LISTEN connection failed: %s", exc)
            finally:
                self.pid = None
                self.connected.clear()
                self.on_disconnected()
                await _close(conn)
            if time.monotonic() - started >= self.stable_after:
                delay = self.min_backoff
            log.warning("real-time: LISTEN connection lost; reconnecting in %.1f s", delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.max_backoff)

    async def _listen(self, conn: ListenConnection) -> None:
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        await conn.add_listener(self.channel, self._on_notification)
        self.pid = conn.get_server_pid()
        self.connections += 1
        self.connected.set()
        if self.connections > 1:
            log.info("real-time: LISTEN connection restored; re-reading watched users")
        self.on_connected()
        while not lost.is_set():
            try:
                async with asyncio.timeout(self.health_interval):  # not wait_for: see billing.background
                    await lost.wait()
            except TimeoutError:
                # A half-open TCP connection never reports its end: ask the server.
                await asyncio.wait_for(conn.fetchval("SELECT 1"), self.health_timeout)

    def _on_notification(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            account_id = int(payload)
        except ValueError:
            log.warning("real-time: ignoring notification %r", payload[:64])
            return
        self.on_accounts((account_id,))


async def _close(conn: ListenConnection) -> None:
    if conn.is_closed():
        return
    try:
        await asyncio.wait_for(conn.close(), 2)
    except Exception:
        conn.terminate()


class DataVersionPoller:
    """SQLite: notices commits by any other connection (other processes included).

    Polls `PRAGMA data_version` on a dedicated connection, which changes whenever another
    connection committed, and calls `on_change` then, and after each (re)connection.
    """

    def __init__(self, path: str, on_change: Callable[[], None], *, interval: float = 0.5) -> None:
        self.path = path
        self.on_change = on_change
        self.interval = interval
        self.polls = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="billing-realtime-sqlite-poller")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        conn: aiosqlite.Connection | None = None
        last: int | None = None
        try:
            while True:
                try:
                    if conn is None:
                        conn = await aiosqlite.connect(self.path, timeout=10)
                        last = None
                    async with conn.execute("PRAGMA data_version") as cursor:
                        row = await cursor.fetchone()
                    version = int(row[0]) if row is not None else 0
                    self.polls += 1
                    if version != last:
                        last = version
                        self.on_change()
                except Exception as exc:
                    log.warning("real-time: SQLite change poll failed: %s", exc)
                    if conn is not None:
                        await _close_sqlite(conn)
                    conn = None
                await asyncio.sleep(self.interval)
        finally:
            if conn is not None:
                await _close_sqlite(conn)


async def _close_sqlite(conn: aiosqlite.Connection) -> None:
    try:
        await conn.close()
    except Exception as exc:
        log.warning("real-time: closing the SQLite poll connection failed: %s", exc)


class LocalChanges:
    """This process's commits as they happen: the hub's on SQLite, the account cache's on PostgreSQL."""

    def __init__(self, database: Database, on_accounts: Callable[[Iterable[int]], None]) -> None:
        self.broadcast = LocalBroadcast.of(database)
        self.on_accounts = on_accounts

    async def start(self) -> None:
        self.broadcast.subscribe(self._deliver)

    async def stop(self) -> None:
        self.broadcast.unsubscribe(self._deliver)

    def _deliver(self, account_ids: set[int]) -> None:
        self.on_accounts(account_ids)


# Wiring --------------------------------------------------------------------------------------


@dataclass
class Realtime:
    """One process's real-time updates: the hub and the sources that tell it about changes."""

    hub: BillingStateHub
    sources: list[ChangeSource]

    @classmethod
    def for_database(
        cls, database: Database, policy: AccessPolicy, *, cache: AccountCache | None = None
    ) -> Realtime:
        """The hub and its sources; on PostgreSQL, `cache` hears of the same changes."""
        hub = BillingStateHub(database, policy)
        sources: list[ChangeSource] = []
        if database.is_postgres:
            on_accounts, on_connected, on_lost = _signals(hub, cache)
            listener = PostgresListener(
                asyncpg_connector(database), on_accounts, on_connected, on_disconnected=on_lost
            )
            sources.append(listener)
            if cache is not None:  # this process's own commits reach the cache before their writer answers
                sources.append(LocalChanges(database, cache.accounts_changed))
        else:
            sources.append(LocalChanges(database, hub.accounts_changed))
            path = database.engine.url.database
            if path and path != ":memory:" and not path.startswith("file:"):
                sources.append(DataVersionPoller(path, hub.resync))
        return cls(hub, sources)

    @property
    def listener(self) -> PostgresListener | None:
        return next((s for s in self.sources if isinstance(s, PostgresListener)), None)

    async def start(self) -> None:
        await self.hub.start()
        for source in self.sources:
            await source.start()

    async def stop(self) -> None:
        for source in reversed(self.sources):
            await source.stop()
        await self.hub.stop()


_Signals = tuple[Callable[[Iterable[int]], None], Callable[[], None], Callable[[], None]]


def _signals(hub: BillingStateHub, cache: AccountCache | None) -> _Signals:
    """What the LISTEN connection tells: accounts changed, connected, lost; to the cache too."""
    if cache is None:
        return hub.accounts_changed, hub.resync, lambda: None
    account_cache = cache

    def on_accounts(account_ids: Iterable[int]) -> None:
        ids = tuple(account_ids)
        account_cache.accounts_changed(ids)
        hub.accounts_changed(ids)

    def on_connected() -> None:
        account_cache.connected()
        hub.resync()

    return on_accounts, on_connected, account_cache.disconnected
