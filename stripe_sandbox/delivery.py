"""Signed, at-least-once delivery of the outbox (`sbx_event`) to the webhook endpoints.

Stripe's behaviour, as documented: each event is POSTed as JSON to the endpoint with a
`Stripe-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>` header, where `t` is the
real time of sending; any non-2xx answer or network error is retried with exponential backoff.

How the sandbox does it, so several processes sharing one sandbox database behave:

* claim: in one short write transaction (the store's global lock), pick the due events, oldest
  first, and lease them by pushing `next_attempt_at` ahead; another process skips them;
* send: POST outside any transaction (the receiver writes to its own database and may call back
  into the sandbox, which on SQLite would wait for our lock);
* record: in another short transaction, mark the event delivered, or count the failed attempt,
  keep the error and schedule the next one (`base_delay * 2**(failures-1)`, capped), giving up
  after `max_attempts`.

Where: to every enabled endpoint registered with `/v1/webhook_endpoints` whose `enabled_events`
name the event's type (or `*`), each signed with its own secret; an event has been delivered once
every such endpoint answered 2xx (`sbx_endpoint_delivery` remembers which did, so a retry goes
only to the others). With no endpoint registered, to the service's own route, signed with the
configured secret, as before endpoints existed.

A kick after each commit makes delivery prompt; the background loop polls for retries and for
events written by other processes (the CLI, other service processes).

Modes (`sbx_state.delivery_mode`): `ordered` sends each batch one by one in creation order;
`shuffled_duplicated` shuffles each batch and sends every event 1-3 times, for tests of
idempotent, order-independent handlers. A failed event is retried later in either mode, as on
Stripe, so later events may overtake it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Any

import httpx
from sqlalchemy import delete, func, insert, select, update

from stripe_sandbox.api import SandboxConfig
from stripe_sandbox.resources.webhook_endpoints import delivery_targets, wants
from stripe_sandbox.store import Store, delivery_attempts, endpoint_deliveries, events

log = logging.getLogger("stripe_sandbox.delivery")

ORDERED = "ordered"
SHUFFLED_DUPLICATED = "shuffled_duplicated"
MODES = (ORDERED, SHUFFLED_DUPLICATED)
MODE_STATE_KEY = "delivery_mode"
USER_AGENT = "Stripe/1.0 (+https://stripe.com/docs/webhooks)"
MAX_COPIES = 3  # shuffled_duplicated sends each event 1..MAX_COPIES times
RESPONSE_KEPT = 1000  # characters of each answer kept in `sbx_delivery_attempt`


def signature_header(secret: str, body: bytes, timestamp: int) -> str:
    """Stripe's `Stripe-Signature` for `body` signed at `timestamp`."""
    signed = f"{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


@dataclass(frozen=True)
class _Target:
    url: str
    secret: str
    endpoint_id: str | None  # None: the service's own route (no endpoint registered)


@dataclass(frozen=True)
class _Claimed:
    seq: int
    id: str
    body: bytes
    targets: tuple[_Target, ...]


@dataclass(frozen=True)
class Attempt:
    """One POST of an event to one endpoint: its HTTP status (None: no answer) and response."""

    url: str
    status: int | None
    response: str

    @property
    def error(self) -> str | None:
        if self.status is None:
            return self.response
        if 200 <= self.status < 300:
            return None
        return f"HTTP {self.status}: {self.response[:500]}"

    def as_dict(self) -> dict[str, Any]:
        return {"url": self.url, "status": self.status, "response": self.response}


class UnknownEvent(LookupError):
    """No event with that id in the outbox."""


@dataclass(frozen=True)
class DeliveryStats:
    mode: str
    enabled: bool
    endpoint_url: str
    pending: int  # not delivered yet, attempts left (including those waiting for a retry)
    delivered: int
    failed: int  # given up after `max_attempts`
    failed_attempts: int  # every attempt that got no 2xx

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "enabled": self.enabled,
            "endpoint_url": self.endpoint_url,
            "pending": self.pending,
            "delivered": self.delivered,
            "failed": self.failed,
            "failed_attempts": self.failed_attempts,
        }


class Deliverer:
    """Delivers one sandbox's outbox; `kick` after commits, `run` as its background loop.

    The knobs are plain attributes so tests can shorten them before the sandbox starts.
    """

    def __init__(
        self,
        store: Store,
        config: SandboxConfig,
        *,
        base_delay: float = 1.0,
        max_delay: float = 3600.0,
        max_attempts: int = 10,
        poll_interval: float = 0.5,
        batch_size: int = 20,
        timeout_seconds: float = 10.0,
    ) -> None:
        self.store = store
        self.config = config
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.max_attempts = max_attempts
        self.poll_interval = poll_interval
        self.batch_size = batch_size
        self.timeout_seconds = timeout_seconds
        self._wake = asyncio.Event()
        self._pass_lock = asyncio.Lock()

    @property
    def enabled(self) -> bool:
        return self.config.deliver_webhooks

    def retry_delay(self, failures: int) -> float:
        """Seconds to wait after the `failures`-th failed attempt of an event."""
        return float(min(self.base_delay * 2 ** (failures - 1), self.max_delay))

    # Triggers --------------------------------------------------------------------------------

    async def kick(self, emitted: list[dict[str, Any]]) -> None:
        """An `events_committed` hook: wake the loop now instead of at its next poll."""
        self._wake.set()

    async def run(self) -> None:
        """The background loop: deliver whatever is due, then sleep until kicked or polled."""
        while True:
            if self.enabled:
                try:
                    while await self.deliver_due():
                        pass
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("webhook delivery pass failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)
            self._wake.clear()

    async def drain(self, timeout: float = 10.0) -> DeliveryStats:  # noqa: ASYNC109 - a deadline, not a cancel scope
        """Deliver until nothing is pending (retries included); TimeoutError past `timeout`.

        Returns at once when delivery is disabled: nothing would ever leave the outbox.
        """
        deadline = time.monotonic() + timeout
        while True:
            if self.enabled:
                await self.deliver_due()
            stats = await self.stats()
            if not self.enabled or stats.pending == 0:
                return stats
            if time.monotonic() >= deadline:
                raise TimeoutError(f"webhook outbox not drained after {timeout}s: {stats.as_dict()}")
            await asyncio.sleep(min(0.05, self.poll_interval))

    # One pass --------------------------------------------------------------------------------

    async def deliver_due(self) -> int:
        """Claim one batch of due events, send it, record the results; the number claimed."""
        async with self._pass_lock:
            claiming = asyncio.ensure_future(self._claim())
            try:
                mode, batch = await asyncio.shield(claiming)
            except asyncio.CancelledError:
                # Stopping while the claim commits: let it end, then give its batch back at once
                # (else it would wait out the lease, minutes, after a restart).
                _, taken = await claiming
                await self._release([event.id for event in taken])
                raise
            if not batch:
                return 0
            sends = list(batch)
            if mode == SHUFFLED_DUPLICATED:
                sends = [event for event in batch for _ in range(random.randint(1, MAX_COPIES))]
                random.shuffle(sends)
            # event id -> target -> the first 2xx attempt of any copy, else the last attempt
            results: dict[str, dict[_Target, Attempt]] = {event.id: {} for event in batch}
            try:
                async with httpx.AsyncClient(timeout=self.timeout_seconds) as client:
                    for event in sends:
                        for target in event.targets:
                            attempt = await self._send(client, event, target)
                            kept = results[event.id].get(target)
                            if kept is None or kept.error is not None:
                                results[event.id][target] = attempt
            except asyncio.CancelledError:
                # The process is stopping: the batch is due again now, not when the lease ends
                # (Stripe retries what it was not sure of; a receiver dedupes by event id).
                await self._release([event.id for event in batch])
                raise
            await self._record(results)
            return len(batch)

    async def _release(self, ids: list[str]) -> None:
        try:
            async with self.store.transaction() as tx:
                await tx.conn.execute(
                    update(events)
                    .where(events.c.id.in_(ids), events.c.delivered.is_(False))
                    .values(next_attempt_at=int(time.time()))
                )
        except Exception:
            log.exception("could not release %d claimed event(s); their lease will expire", len(ids))

    async def _claim(self) -> tuple[str, list[_Claimed]]:
        now = int(time.time())
        async with self.store.transaction() as tx:
            mode = await tx.get_state(MODE_STATE_KEY, ORDERED)
            rows = (
                await tx.conn.execute(
                    select(events.c.seq, events.c.id, events.c.type, events.c.data)
                    .where(
                        events.c.delivered.is_(False),
                        events.c.attempts < self.max_attempts,
                        events.c.next_attempt_at.is_not(None),
                        events.c.next_attempt_at <= now,
                    )
                    .order_by(events.c.seq)
                    .limit(self.batch_size)
                )
            ).all()
            if not rows:
                return mode, []
            copies = MAX_COPIES if mode == SHUFFLED_DUPLICATED else 1
            lease = now + math.ceil(self.timeout_seconds * copies * len(rows)) + 30
            await tx.conn.execute(
                update(events)
                .where(events.c.seq.in_([row.seq for row in rows]))
                .values(next_attempt_at=lease)
            )
            registered = await delivery_targets(tx)
            reached: set[tuple[str, str]] = set()
            if registered is not None:
                done = await tx.conn.execute(
                    select(endpoint_deliveries.c.event_id, endpoint_deliveries.c.endpoint_id).where(
                        endpoint_deliveries.c.event_id.in_([row.id for row in rows])
                    )
                )
                reached = {(found.event_id, found.endpoint_id) for found in done}
        own: tuple[_Target, ...] = (_Target(self.config.endpoint_url, self.config.webhook_secret, None),)
        claimed = []
        for row in rows:
            targets = own
            if registered is not None:
                targets = tuple(
                    _Target(found["url"], secret, found["id"])
                    for found, secret in registered
                    if wants(found, row.type) and (row.id, found["id"]) not in reached
                )
            claimed.append(_Claimed(row.seq, row.id, str(row.data).encode(), targets))
        return mode, claimed

    async def _send(self, client: httpx.AsyncClient, event: _Claimed, target: _Target) -> Attempt:
        """POST one event to one endpoint; what it answered."""
        timestamp = int(time.time())  # real time: the sandbox clock may be far ahead
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            "User-Agent": USER_AGENT,
            "Stripe-Signature": signature_header(target.secret, event.body, timestamp),
        }
        try:
            response = await client.post(target.url, content=event.body, headers=headers)
        except httpx.HTTPError as exc:
            return Attempt(target.url, None, f"{type(exc).__name__}: {exc}"[:RESPONSE_KEPT])
        return Attempt(target.url, response.status_code, response.text[:RESPONSE_KEPT])

    async def _record(self, results: dict[str, dict[_Target, Attempt]]) -> None:
        now = time.time()
        async with self.store.transaction() as tx:
            for event_id, by_target in results.items():
                await _keep_attempts(tx.conn, event_id, list(by_target.values()), resend=False)
                errors = [a.error for a in by_target.values() if a.error is not None]
                error = errors[0] if errors else None
                if errors:
                    for target, attempt in by_target.items():
                        if attempt.error is None and target.endpoint_id is not None:
                            await tx.conn.execute(
                                insert(endpoint_deliveries).values(
                                    event_id=event_id, endpoint_id=target.endpoint_id
                                )
                            )
                else:
                    await tx.conn.execute(
                        delete(endpoint_deliveries).where(endpoint_deliveries.c.event_id == event_id)
                    )
                if error is None:
                    await tx.conn.execute(
                        update(events)
                        .where(events.c.id == event_id)
                        .values(delivered=True, attempts=events.c.attempts + 1, next_attempt_at=None)
                    )
                    continue
                row = (
                    await tx.conn.execute(
                        select(events.c.attempts, events.c.delivered).where(events.c.id == event_id)
                    )
                ).first()
                if row is None or row.delivered:
                    continue  # another process delivered it after our lease ran out
                failures = int(row.attempts) + 1
                retry_at = (
                    math.ceil(now + self.retry_delay(failures)) if failures < self.max_attempts else None
                )
                await tx.conn.execute(
                    update(events)
                    .where(events.c.id == event_id)
                    .values(attempts=failures, last_error=error, next_attempt_at=retry_at)
                )
                if retry_at is None:
                    log.warning("webhook %s not delivered after %d attempts: %s", event_id, failures, error)
                else:
                    log.info(
                        "webhook %s attempt %d failed (%s); retry at %d", event_id, failures, error, retry_at
                    )

    # Resend ----------------------------------------------------------------------------------

    async def resend(self, event_id: str) -> list[Attempt]:
        """Send one event again now, to every endpoint that wants it (as the Dashboard's "Resend"
        does), whether or not it was delivered; the attempts are kept and counted, and an
        undelivered event that every endpoint now accepted is marked delivered."""
        async with self.store.transaction() as tx:
            row = (
                await tx.conn.execute(
                    select(events.c.id, events.c.type, events.c.data).where(events.c.id == event_id)
                )
            ).first()
            if row is None:
                raise UnknownEvent(event_id)
            registered = await delivery_targets(tx)
        if registered is None:
            targets: tuple[_Target, ...] = (
                _Target(self.config.endpoint_url, self.config.webhook_secret, None),
            )
        else:
            targets = tuple(
                _Target(found["url"], secret, found["id"])
                for found, secret in registered
                if wants(found, row.type)
            )
        event = _Claimed(0, row.id, str(row.data).encode(), targets)
        async with httpx.AsyncClient(timeout=self.timeout_seconds) as client:
            sent = [await self._send(client, event, target) for target in targets]
        async with self.store.transaction() as tx:
            await _keep_attempts(tx.conn, event_id, sent, resend=True)
            values: dict[str, Any] = {"attempts": events.c.attempts + 1}
            if all(attempt.error is None for attempt in sent):
                values.update(delivered=True, next_attempt_at=None)
                await tx.conn.execute(
                    delete(endpoint_deliveries).where(endpoint_deliveries.c.event_id == event_id)
                )
            else:
                values["last_error"] = next(a.error for a in sent if a.error is not None)
            await tx.conn.execute(update(events).where(events.c.id == event_id).values(**values))
        return sent

    # Introspection ---------------------------------------------------------------------------

    async def stats(self) -> DeliveryStats:
        undelivered = events.c.delivered.is_(False)
        async with self.store.transaction() as tx:
            mode = await tx.get_state(MODE_STATE_KEY, ORDERED)
            pending = await tx.conn.scalar(
                select(func.count()).where(undelivered, events.c.attempts < self.max_attempts)
            )
            failed = await tx.conn.scalar(
                select(func.count()).where(undelivered, events.c.attempts >= self.max_attempts)
            )
            delivered = await tx.conn.scalar(select(func.count()).where(events.c.delivered.is_(True)))
            attempts = await tx.conn.scalar(select(func.coalesce(func.sum(events.c.attempts), 0)))
        return DeliveryStats(
            mode=mode,
            enabled=self.enabled,
            endpoint_url=self.config.endpoint_url,
            pending=int(pending or 0),
            delivered=int(delivered or 0),
            failed=int(failed or 0),
            failed_attempts=int(attempts or 0) - int(delivered or 0),
        )


async def _keep_attempts(conn: Any, event_id: str, attempts: list[Attempt], *, resend: bool) -> None:
    if not attempts:
        return
    at = int(time.time())
    await conn.execute(
        insert(delivery_attempts),
        [
            {
                "event_id": event_id,
                "url": a.url,
                "status": a.status,
                "response": a.response,
                "at": at,
                "resend": resend,
            }
            for a in attempts
        ],
    )
