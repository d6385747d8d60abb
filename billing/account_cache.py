"""Account states remembered between requests, dropped by the committed-change notifications.

Reading the viewer's account row is half of a small query's server CPU (bench/RESULTS.md, fix
15). A process may answer from a state it read earlier only while it is sure to hear of every
later change of that account, so the cache is fed by the notifications that drive
`billingStateChanged` (billing/realtime.py):

- every committed write of a `billing_account` row notifies `billing_account_changed` (migration
  0013's trigger), and the process's LISTEN connection drops that account's entry when the
  notification arrives;
- this process's own writes through `billing.sync` (and the other writers that publish) drop it
  as their transaction commits, before the writer answers: a mutation's caller reads its own write;
- while the LISTEN connection is down, nothing is served from the cache and nothing is kept:
  the entries go when the loss is noticed, and a state read before a reconnection is not kept;
- a read that a notification overtakes is not kept (`_version`): the state it read may be older
  than the commit notified;
- every entry is dropped after `seconds` in any case, which bounds how stale an answer can be if
  a notification is lost without the connection being seen to fail (a half-open TCP connection
  is found by the listener's health check within 20 s).

So a process never answers with a state older than the last notification it has received for
that account. What it may answer in between is the state before a commit whose notification is
still on its way: PostgreSQL sends it at commit, and it is applied when the process's event loop
next reads the LISTEN socket (under a millisecond on one host, see docs/reliability.md).

PostgreSQL only: SQLite's service is one process whose cross-process writes (the CLI) are noticed
by polling, so it reads the row on every request.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from billing.access import SubscriptionState, load_subscription
from billing.metrics import ACCOUNT_CACHE_LIVE, ACCOUNT_CACHE_LOOKUPS
from billing.settings import Settings
from db.engine import Database

_HITS = ACCOUNT_CACHE_LOOKUPS.labels(result="hit")
_MISSES = ACCOUNT_CACHE_LOOKUPS.labels(result="miss")


def account_cache(database: Database, settings: Settings) -> AccountCache | None:
    """The process's cache where it is sound and asked for: on PostgreSQL, with FAST_PATHS and
    ACCOUNT_CACHE_SECONDS above 0."""
    if not (database.is_postgres and settings.fast_paths and settings.account_cache_seconds > 0):
        return None
    return AccountCache(seconds=settings.account_cache_seconds)


class AccountCache:
    """Subscription states by owner key (`SubscriptionState.user_id`), for `seconds` at most."""

    def __init__(
        self,
        *,
        seconds: float,
        max_entries: int = 100_000,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.seconds = seconds
        self.max_entries = max_entries
        self.monotonic = monotonic
        self.live = False  # True while the LISTEN connection is in place
        self.notifications = 0  # account ids heard of, for observability and tests
        self._entries: dict[str, tuple[float, SubscriptionState]] = {}
        self._owner_of: dict[int, str] = {}  # account id -> owner key, for the entries that have one
        self._unowned: set[str] = set()  # owners remembered as having no account
        self._version = 0  # moves on every drop: a read that saw it move is not kept
        ACCOUNT_CACHE_LIVE.set(0)

    def remembered(self, owner: str) -> SubscriptionState | None:
        """The owner's state if it is here and fresh, without awaiting (counted as a hit)."""
        entry = self._entries.get(owner)
        if entry is not None and entry[0] > self.monotonic():
            _HITS.inc()
            return entry[1]
        return None

    async def load(self, database: Database, owner: str) -> SubscriptionState:
        """The owner's state: remembered, or read (and remembered if nothing changed meanwhile)."""
        state = self.remembered(owner)
        if state is not None:
            return state
        _MISSES.inc()
        version = self._version
        state = await load_subscription(database, owner)
        if self.live and version == self._version:
            self._keep(owner, state)
        return state

    def _keep(self, owner: str, state: SubscriptionState) -> None:
        if len(self._entries) >= self.max_entries:
            self._clear()
        self._entries[owner] = (self.monotonic() + self.seconds, state)
        if state.account_id is None:
            self._unowned.add(owner)
        else:
            self._owner_of[state.account_id] = owner

    # Signals (billing/realtime.py) -----------------------------------------------------------

    def accounts_changed(self, account_ids: Iterable[int]) -> None:
        self._version += 1
        for account_id in account_ids:
            self.notifications += 1
            owner = self._owner_of.pop(account_id, None)
            if owner is not None:
                self._entries.pop(owner, None)
            else:
                # An account this cache has no entry for: perhaps a new one, of an owner
                # remembered as having none. Those entries go.
                for unowned in self._unowned:
                    self._entries.pop(unowned, None)
                self._unowned = set()

    def connected(self) -> None:
        """LISTEN is in place: from now on every change is heard of."""
        self._clear()
        self.live = True
        ACCOUNT_CACHE_LIVE.set(1)

    def disconnected(self) -> None:
        """The LISTEN connection is lost: changes may go unheard, so nothing is served."""
        self.live = False
        ACCOUNT_CACHE_LIVE.set(0)
        self._clear()

    def _clear(self) -> None:
        self._version += 1
        self._entries = {}
        self._owner_of = {}
        self._unowned = set()
