"""Delivering host events: sign each attempt afresh, POST it, retry on a schedule.

The worker claims due outbox rows with a lease (`billing/work_queue.py`, safe with several
processes), POSTs each outside any transaction, then records the attempt (status, latency) and
the outcome in one short write. Standard Webhooks headers: `webhook-id` is the event's message
id on every attempt (receivers deduplicate on it); `webhook-timestamp` and `webhook-signature`
are made at each attempt (a receiver refuses a stale timestamp, so a stored signature would
fail every retry), signed with every configured secret during a rotation.

Order: an account's events are delivered one at a time, oldest first: a later event waits while
an earlier one is being retried, until it is delivered or failed for good (events of different
accounts do not wait for each other). A `410 Gone` disables the endpoint: nothing is sent until
`billing host-events replay` enables it again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
from sqlalchemy import and_, exists, select, update
from sqlalchemy.dialects import postgresql, sqlite
from standardwebhooks import Webhook

from billing.background import BackgroundWorker
from billing.clock import Clock, utcnow
from billing.work_queue import MAX_ERROR_LENGTH, LeasedQueue
from db.engine import Database
from db.models import HostEventStatus, host_attempt_table, host_endpoint_table, host_event_table

log = logging.getLogger("billing.host_events")

LEASE = timedelta(minutes=2)  # longer than a POST may take (TIMEOUT_SECONDS)
TIMEOUT_SECONDS = 15.0
MAX_RETRY_AFTER = timedelta(days=1)
OUTBOX = LeasedQueue(host_event_table, HostEventStatus.PENDING.value, HostEventStatus.SENDING.value, LEASE)
UNDELIVERED = (HostEventStatus.PENDING.value, HostEventStatus.SENDING.value)


@dataclass(frozen=True)
class DeliveryConfig:
    url: str
    secrets: Sequence[str]  # whsec_ secrets; each attempt carries a signature by each
    delays: Sequence[float]  # seconds before each retry: len(delays) + 1 attempts in all
    timeout_seconds: float = TIMEOUT_SECONDS


def signed_headers(
    secrets: Sequence[str], message_id: str, body: bytes, *, timestamp: datetime
) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt (space-separated signatures when rotating)."""
    signatures = " ".join(Webhook(secret).sign(message_id, timestamp, body) for secret in secrets)
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": signatures,
        "content-type": "application/json",
        "user-agent": "graph-billing-host-events",
    }


def retry_after(value: str | None, *, now: datetime) -> timedelta | None:
    """`Retry-After` as seconds or an HTTP date, capped at a day; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    wait: timedelta | None
    if value.isdigit():
        wait = timedelta(seconds=int(value))
    else:
        try:
            wait = parsedate_to_datetime(value).astimezone(UTC) - now
        except (TypeError, ValueError, IndexError):
            return None
    return max(timedelta(0), min(wait, MAX_RETRY_AFTER))


@dataclass(frozen=True)
class Claimed:
    id: int
    message_id: str
    type: str
    attempts: int
    payload: dict[str, Any]


@dataclass(frozen=True)
class Outcome:
    status_code: int | None
    latency_ms: int
    error: str | None
    retry_after: timedelta | None = None

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300

    @property
    def gone(self) -> bool:
        return self.status_code == 410


@dataclass
class DeliveryReport:
    delivered: int = 0
    retrying: int = 0
    failed: int = 0
    disabled: bool = False
    attempts: list[tuple[int, Outcome]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.delivered + self.retrying + self.failed


def _oldest_of_its_account() -> Any:
    """No earlier undelivered event of the same account: an account's events go one by one."""
    earlier = host_event_table.alias("earlier")
    event = host_event_table.c
    return ~exists(
        select(earlier.c.id).where(
            and_(
                earlier.c.account_id == event.account_id,
                earlier.c.id < event.id,
                earlier.c.status.in_(UNDELIVERED),
            )
        )
    )


class HostEventDelivery(BackgroundWorker):
    """Claims due host events and POSTs them to HOST_WEBHOOK_URL. One per process."""

    name = "host event delivery"

    def __init__(
        self,
        *,
        database: Database,
        config: DeliveryConfig,
        clock: Clock = utcnow,
        batch_size: int = 50,
        poll_seconds: float = 1.0,
        transport: httpx.AsyncBaseTransport | None = None,
        lease: timedelta = LEASE,
    ) -> None:
        super().__init__(poll_seconds=poll_seconds)
        self.database = database
        self.config = config
        self.clock = clock
        self.batch_size = batch_size
        self.queue = (
            OUTBOX if lease == LEASE else LeasedQueue(host_event_table, OUTBOX.waiting, OUTBOX.claimed, lease)
        )
        self._client = httpx.AsyncClient(
            timeout=config.timeout_seconds, follow_redirects=False, transport=transport
        )
        self._ready = _oldest_of_its_account()

    async def close(self) -> None:
        await self._client.aclose()

    async def drain(self, *, max_batches: int = 1000) -> DeliveryReport:
        """Deliver everything due now (tests, CLI)."""
        total = DeliveryReport()
        for _ in range(max_batches):
            report = await self.deliver_batch()
            total.delivered += report.delivered
            total.retrying += report.retrying
            total.failed += report.failed
            total.disabled = total.disabled or report.disabled
            total.attempts.extend(report.attempts)
            if report.total == 0 or report.disabled:
                break
        return total

    async def deliver_batch(self) -> DeliveryReport:
        report = DeliveryReport()
        if await endpoint_disabled(self.database, self.config.url):
            report.disabled = True
            return report
        claimed = await self.claim()
        if not claimed:
            return report
        outcomes = await asyncio.gather(*(self._post(event) for event in claimed))
        await self._record(list(zip(claimed, outcomes, strict=True)), report)
        return report

    async def claim(self) -> list[Claimed]:
        e = host_event_table.c
        rows = await self.queue.claim(
            self.database,
            now=self.clock(),
            limit=self.batch_size,
            order_by=[e.id],
            returning=[e.id, e.message_id, e.type, e.attempts, e.payload],
            where=self._ready,
        )
        return [Claimed(row.id, row.message_id, row.type, row.attempts, row.payload) for row in rows]

    async def _post(self, event: Claimed) -> Outcome:
        body = json.dumps(event.payload, separators=(",", ":")).encode()
        headers = signed_headers(self.config.secrets, event.message_id, body, timestamp=utcnow())
        started = time.perf_counter()
        try:
            response = await self._client.post(self.config.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            latency = int((time.perf_counter() - started) * 1000)
            return Outcome(None, latency, f"{type(exc).__name__}: {exc}")
        latency = int((time.perf_counter() - started) * 1000)
        if 200 <= response.status_code < 300:
            return Outcome(response.status_code, latency, None)
        wait = retry_after(response.headers.get("retry-after"), now=utcnow())
        error = f"HTTP {response.status_code}: {response.text[:200]}"
        return Outcome(response.status_code, latency, error, wait)

    async def _record(self, results: list[tuple[Claimed, Outcome]], report: DeliveryReport) -> None:
        now = self.clock()
        t = host_event_table
        async with self.database.write() as conn:
            await conn.execute(
                host_attempt_table.insert(),
                [
                    {
                        "event_id": event.id,
                        "attempt": event.attempts,
                        "url": self.config.url,
                        "attempted_at": now,
                        "status_code": outcome.status_code,
                        "latency_ms": outcome.latency_ms,
                        "error": None if outcome.error is None else outcome.error[:MAX_ERROR_LENGTH],
                    }
                    for event, outcome in results
                ],
            )
            for event, outcome in results:
                report.attempts.append((event.id, outcome))
                values = self._outcome_values(event, outcome, now, report)
                await conn.execute(update(t).where(t.c.id == event.id).values(values))
            if any(outcome.gone for _, outcome in results):
                await disable_endpoint(conn, self.database, self.config.url, now=now)
                report.disabled = True
                log.error("host webhook endpoint %s answered 410 Gone: disabled", self.config.url)

    def _outcome_values(
        self, event: Claimed, outcome: Outcome, now: datetime, report: DeliveryReport
    ) -> dict[str, Any]:
        code = {"last_status_code": outcome.status_code}
        if outcome.delivered:
            report.delivered += 1
            return {**OUTBOX.settle(HostEventStatus.DELIVERED.value), **code, "delivered_at": now}
        if outcome.gone:  # not the event's fault: it waits, its attempt not counted
            report.retrying += 1
            return {**OUTBOX.retry_at(now, error=outcome.error), **code, "attempts": event.attempts - 1}
        delays = self.config.delays
        if event.attempts > len(delays):
            report.failed += 1
            log.warning("host event %s failed for good after %d attempts", event.message_id, event.attempts)
            return {**OUTBOX.settle(HostEventStatus.FAILED.value, error=outcome.error), **code}
        report.retrying += 1
        wait = timedelta(seconds=delays[event.attempts - 1])
        if outcome.retry_after is not None:
            wait = max(wait, outcome.retry_after)
        return {**OUTBOX.retry_at(now + wait, error=outcome.error), **code}


# The endpoint -----------------------------------------------------------------------------------


async def endpoint_disabled(database: Database, url: str) -> bool:
    async with database.read() as conn:
        row = (
            await conn.execute(
                select(host_endpoint_table.c.disabled_at).where(host_endpoint_table.c.url == url)
            )
        ).first()
    return row is not None and row.disabled_at is not None


async def disable_endpoint(conn: Any, database: Database, url: str, *, now: datetime) -> None:
    await _set_endpoint(conn, database, url, disabled_at=now, reason="410 Gone", now=now)


async def _set_endpoint(
    conn: Any,
    database: Database,
    url: str,
    *,
    disabled_at: datetime | None,
    reason: str | None,
    now: datetime,
) -> None:
    insert = (postgresql.insert if database.is_postgres else sqlite.insert)(host_endpoint_table)
    values = {"disabled_at": disabled_at, "disabled_reason": reason, "updated_at": now}
    await conn.execute(
        insert.values(url=url, **values).on_conflict_do_update(index_elements=["url"], set_=values)
    )


async def enable_endpoint(conn: Any, database: Database, url: str, *, now: datetime) -> None:
    await _set_endpoint(conn, database, url, disabled_at=None, reason=None, now=now)
