"""Stripe webhooks: verify, store once, apply in the background.

Design (the "inbox"): the route verifies the signature on the raw bytes, stores the event by
its id with one `INSERT ... ON CONFLICT DO NOTHING`, and only then answers 2xx. Stripe advises
acknowledging quickly, and a duplicate costs one no-op insert. A worker in every service
process claims stored events with a lease (`billing/work_queue.py`: `FOR UPDATE SKIP LOCKED` on
PostgreSQL; on SQLite one writer at a time), groups them by customer and runs the shared sync
once per customer: an event is only a hint, so order, duplicates and bursts do not matter. A
failure leaves the event pending with its error and a backoff; `billing events replay` runs
events again.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Text, bindparam, cast, type_coerce, update
from sqlalchemy.dialects import postgresql, sqlite

from billing import tracing
from billing.background import BackgroundWorker
from billing.clock import Clock, utcnow
from billing.customer_locks import CustomerLocks
from billing.errors import BillingError
from billing.host_events.events import HostEventConfig, StripeTrigger
from billing.logs import EVENT_ID as APPLYING
from billing.metrics import WEBHOOKS_APPLIED
from billing.notifier import Notification, NotificationKind, Notifier
from billing.stripe_gateway import StripeGateway
from billing.stripe_objects import field as get
from billing.stripe_objects import object_id, stripe_time
from billing.sync import SyncResult, notifications_for, notify_all, sync_customer
from billing.work_queue import LeasedQueue, release_on_shutdown
from db.engine import Database
from db.enums import EventStatus
from db.models import event_table

log = logging.getLogger("billing.webhooks")

EVENT_ID = re.compile(r"evt_[A-Za-z0-9_]{1,251}")  # Stripe's ids: a prefix and letters and digits
EVENT_TYPE = re.compile(r"[a-z0-9_.]{1,128}")  # e.g. customer.subscription.updated
MAX_CREATED = 253_402_300_799  # 9999-12-31T23:59:59Z, the last second a datetime can hold

WEBHOOK_PATH = "/webhooks/stripe"  # the route Stripe posts to, below PUBLIC_BASE_URL
TOLERANCE_SECONDS = 300
MAX_ATTEMPTS = 12
LEASE = timedelta(minutes=2)
# The inbox: stored events wait as `pending`, are `processing` while a worker holds them.
INBOX = LeasedQueue(event_table, EventStatus.PENDING.value, EventStatus.PROCESSING.value, LEASE)


# Signature -----------------------------------------------------------------------------------


class InvalidWebhook(Exception):
    """The request is not a genuine, well-formed Stripe event. Answered with 400."""


def verify_signature(
    payload: bytes,
    header: str | None,
    secrets: Sequence[str],
    *,
    now: float | None = None,
    tolerance: int = TOLERANCE_SECONDS,
) -> None:
    """Stripe's scheme: `t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>`.

    Any configured secret may match (rotation). The timestamp must be within `tolerance`
    seconds of now in both directions (the SDK checks only the past).
    """
    if not header:
        raise InvalidWebhook("missing Stripe-Signature header")
    timestamp: int | None = None
    signatures: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t":
            try:
                timestamp = int(value)
            except ValueError:
                raise InvalidWebhook("malformed Stripe-Signature timestamp") from None
        elif key == "v1" and value:
            signatures.append(value)
    if timestamp is None or not signatures:
        raise InvalidWebhook("malformed Stripe-Signature header")
    signed = str(timestamp).encode() + b"." + payload
    expected = [hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest() for secret in secrets]
    if not any(hmac.compare_digest(want, got) for want in expected for got in signatures):
        raise InvalidWebhook("no signature matches")
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        raise InvalidWebhook("signature timestamp outside the tolerance")


@dataclass(frozen=True)
class Envelope:
    id: str
    type: str
    created: datetime
    payload: dict[str, Any]
    raw: str | None = None  # the body as received: stored as it is, not serialised again


def parse_event(payload: bytes) -> Envelope:
    try:
        event = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise InvalidWebhook("body is not JSON") from None
    if not isinstance(event, dict):
        raise InvalidWebhook("body is not a JSON object")
    event_id, event_type, created = event.get("id"), event.get("type"), event.get("created")
    if not isinstance(event_id, str) or not EVENT_ID.fullmatch(event_id):
        raise InvalidWebhook("event has no valid id")
    if not isinstance(event_type, str) or not EVENT_TYPE.fullmatch(event_type):
        raise InvalidWebhook("event has no valid type")
    if not isinstance(created, int) or isinstance(created, bool) or not 0 <= created <= MAX_CREATED:
        raise InvalidWebhook("event has no valid created time")
    if not isinstance(event.get("data"), dict) or not isinstance(event["data"].get("object"), dict):
        raise InvalidWebhook("event has no data.object")
    # A NUL inside a JSON string can only be written as the escape \u0000: without those bytes
    # the walk through the event is not needed.
    if b"\\u0000" in payload and _holds_nul(event):
        # PostgreSQL cannot store U+0000 in text or jsonb: refuse it the same way on every database.
        raise InvalidWebhook("event holds a NUL character")
    created_at = stripe_time(created)
    assert created_at is not None
    try:
        raw: str | None = payload.decode()
    except UnicodeDecodeError:  # JSON in UTF-16 or UTF-32: stored serialised again
        raw = None
    return Envelope(event_id, event_type, created_at, event, raw)


def _holds_nul(value: Any) -> bool:
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


# The inbox -----------------------------------------------------------------------------------


# The payload is bound as the text received (jsonb parses it on PostgreSQL; SQLite keeps JSON as
# text), so the event is not serialised again on the acknowledgement path.
_PAYLOAD_TEXT = bindparam("payload_text", type_=Text)
STORE_EVENT = {
    "postgresql": postgresql.insert(event_table)
    .values(payload=cast(_PAYLOAD_TEXT, postgresql.JSONB))
    .on_conflict_do_nothing(index_elements=["id"]),
    "sqlite": sqlite.insert(event_table)
    .values(payload=type_coerce(_PAYLOAD_TEXT, Text))
    .on_conflict_do_nothing(index_elements=["id"]),
}  # built once, so its compiled form is cached; the values come as parameters


async def store_event(database: Database, envelope: Envelope, *, now: datetime) -> bool:
    """Store the event once; True when it is new. A duplicate is a no-op, never an error.

    One statement, so on PostgreSQL it runs without a transaction around it (one round trip).
    """
    values = {
        "id": envelope.id,
        "type": envelope.type,
        "stripe_created": envelope.created,
        "received_at": now,
        "status": EventStatus.PENDING.value,
        "attempts": 0,
        "next_attempt_at": now,
        "payload_text": envelope.raw if envelope.raw is not None else json.dumps(envelope.payload),
        "trace_context": tracing.traceparent(),
    }
    return bool(await database.insert_one(STORE_EVENT[database.engine.dialect.name], values))


# Applying events -----------------------------------------------------------------------------

SUBSCRIPTION_EVENTS = frozenset(
    {
        "customer.subscription.created",
        "customer.subscription.updated",
        "customer.subscription.deleted",
        "customer.subscription.paused",
        "customer.subscription.resumed",
        "customer.subscription.pending_update_applied",
        "customer.subscription.pending_update_expired",
        "customer.subscription.trial_will_end",
    }
)
INVOICE_EVENTS = frozenset(
    {
        "invoice.created",
        "invoice.finalized",
        "invoice.paid",
        "invoice.payment_succeeded",
        "invoice.payment_failed",
        "invoice.payment_action_required",
        "invoice.updated",
        "invoice.voided",
        "invoice.marked_uncollectible",
    }
)
CUSTOMER_EVENTS = frozenset({"customer.updated", "customer.deleted"})
CHECKOUT_EVENTS = frozenset({"checkout.session.completed"})
# The event types the worker acts on; it records every other type as ignored. A webhook endpoint
# needs to be sent these and no others.
HANDLED = SUBSCRIPTION_EVENTS | INVOICE_EVENTS | CUSTOMER_EVENTS | CHECKOUT_EVENTS

EVENT_NOTIFICATIONS = {
    "invoice.payment_failed": NotificationKind.PAYMENT_FAILED,
    "invoice.payment_action_required": NotificationKind.PAYMENT_ACTION_REQUIRED,
    "customer.subscription.trial_will_end": NotificationKind.TRIAL_ENDING,
    "customer.subscription.deleted": NotificationKind.SUBSCRIPTION_CANCELED,
}


@dataclass(frozen=True)
class Target:
    """What an event asks the worker to sync."""

    customer_id: str | None
    user_id_hint: str | None = None
    invoice_id: str | None = None


def target_of(event_type: str, payload: dict[str, Any]) -> Target | None:
    """None for events this service does not act on (recorded as ignored): a type outside
    `HANDLED`, or a checkout that is not for a subscription."""
    if event_type not in HANDLED:
        return None
    obj = payload["data"]["object"]
    if event_type in CHECKOUT_EVENTS:
        if get(obj, "mode") != "subscription":
            return None
        return Target(object_id(get(obj, "customer")), user_id_hint=get(obj, "client_reference_id"))
    if event_type in INVOICE_EVENTS:
        return Target(object_id(get(obj, "customer")), invoice_id=get(obj, "id"))
    if event_type in CUSTOMER_EVENTS:
        return Target(get(obj, "id"))
    return Target(object_id(get(obj, "customer")))  # SUBSCRIPTION_EVENTS


@dataclass
class Claimed:
    id: str
    type: str
    attempts: int
    payload: dict[str, Any]
    trace_context: str | None = None


@dataclass
class BatchReport:
    processed: int = 0
    ignored: int = 0
    failed: int = 0
    syncs: list[SyncResult] = field(default_factory=list)


class EventProcessor(BackgroundWorker):
    """Claims stored events and applies them through the shared sync. One per process."""

    name = "webhook worker"

    def __init__(
        self,
        *,
        database: Database,
        gateway: StripeGateway,
        notifier: Notifier,
        clock: Clock = utcnow,
        batch_size: int = 100,
        poll_seconds: float = 1.0,
        host_events: HostEventConfig | None = None,
    ) -> None:
        super().__init__(poll_seconds=poll_seconds)
        self.database = database
        self.gateway = gateway
        self.notifier = notifier
        # Events for the host app, written with each sync (None: HOST_WEBHOOK_URL is not set).
        self.host_events = host_events
        self.clock = clock
        self.batch_size = batch_size
        self.locks = CustomerLocks(database, host_events=host_events)

    async def drain(self, *, max_batches: int = 1000) -> BatchReport:
        """Apply everything due now (tests, CLI)."""
        total = BatchReport()
        for _ in range(max_batches):
            report = await self.process_batch()
            total.processed += report.processed
            total.ignored += report.ignored
            total.failed += report.failed
            total.syncs.extend(report.syncs)
            if report.processed + report.ignored + report.failed == 0:
                break
        return total

    async def process_batch(self) -> BatchReport:
        claimed = await self.claim()
        if not claimed:
            return BatchReport()
        try:
            return await self._process(claimed)
        except asyncio.CancelledError:
            # Shutting down: what is not finished goes back to the inbox at once, instead of
            # waiting for the lease to run out (a sync cut short rolled back; it runs again).
            await release_on_shutdown(INBOX, self.database, [(e.id, e.attempts) for e in claimed], self.clock)
            raise

    async def _process(self, claimed: list[Claimed]) -> BatchReport:
        report = BatchReport()
        groups: dict[str, list[tuple[Claimed, Target]]] = {}
        for event in claimed:
            target = target_of(event.type, event.payload)
            if target is None or target.customer_id is None:
                await self._finish(
                    [event],
                    EventStatus.IGNORED,
                    "event type not handled" if target is None else "no customer",
                )
                report.ignored += 1
                continue
            groups.setdefault(target.customer_id, []).append((event, target))
        for customer_id, members in groups.items():
            events = [event for event, _ in members]
            ids = ",".join(event.id for event in events)
            APPLYING.set(ids)  # on the log lines of this apply
            # The child of the first event's ingest span (its traceparent is on the row).
            parent = next((event.trace_context for event in events if event.trace_context), None)
            try:
                with tracing.span("webhook apply", parent=parent, attributes={"stripe.event_ids": ids}):
                    result = await self._apply(customer_id, members)
            except Exception as exc:  # recorded on the events, retried with backoff
                await self._fail(events, exc)
                report.failed += len(events)
                continue
            report.syncs.append(result)
            if result.unknown_customer and not result.customer_deleted:
                await self._finish(
                    events, EventStatus.IGNORED, f"unknown customer {customer_id}; run `billing sync`"
                )
                report.ignored += len(events)
                continue
            await self._finish(events, EventStatus.PROCESSED, None)
            report.processed += len(events)
            await notify_all(
                self.notifier, [*notifications_for(result), *self._notifications(events, result)]
            )
        APPLYING.set(None)
        return report

    async def _apply(self, customer_id: str, members: list[tuple[Claimed, Target]]) -> SyncResult:
        targets = [target for _, target in members]
        hint = next((t.user_id_hint for t in targets if t.user_id_hint), None)
        invoices = sorted({t.invoice_id for t in targets if t.invoice_id})
        return await sync_customer(
            database=self.database,
            gateway=self.gateway,
            locks=self.locks,
            customer_id=customer_id,
            now=self.clock(),
            user_id_hint=hint,
            invoice_ids=invoices,
            host_events=self.host_events,
            triggers=[
                StripeTrigger(
                    event.id,
                    event.type,
                    event.payload["data"]["object"],
                    int(event.payload.get("created") or 0),
                )
                for event, _ in members
            ],
        )

    def _notifications(self, events: list[Claimed], result: SyncResult) -> list[Notification]:
        found = []
        for event in events:
            kind = EVENT_NOTIFICATIONS.get(event.type)
            if kind is not None:
                obj = event.payload["data"]["object"]
                found.append(
                    Notification(
                        kind,
                        result.customer_id,
                        result.user_id,
                        {"event": event.id, "object": get(obj, "id")},
                    )
                )
        return found

    # Claiming and finishing ------------------------------------------------------------

    async def claim(self) -> list[Claimed]:
        e = event_table.c
        rows = await INBOX.claim(
            self.database,
            now=self.clock(),
            limit=self.batch_size,
            order_by=[e.received_at],
            returning=[e.id, e.type, e.attempts, e.payload, e.trace_context],
        )
        return [Claimed(row.id, row.type, row.attempts, row.payload, row.trace_context) for row in rows]

    async def _finish(self, events: list[Claimed], status: EventStatus, note: str | None) -> None:
        async with self.database.write() as conn:
            await conn.execute(
                update(event_table)
                .where(event_table.c.id.in_([event.id for event in events]))
                .values(INBOX.settle(status.value, error=note))
            )
        for event in events:
            _count_applied(event, status.value)

    async def _fail(self, events: list[Claimed], exc: Exception) -> None:
        message = exc.message if isinstance(exc, BillingError) else f"{type(exc).__name__}: {exc}"
        log.warning("applying %d event(s) failed: %s", len(events), message)
        now = self.clock()
        try:
            async with self.database.write() as conn:
                for event in events:
                    values = (
                        INBOX.settle(EventStatus.FAILED.value, error=message)
                        if event.attempts >= MAX_ATTEMPTS
                        else INBOX.retry_later(attempts=event.attempts, now=now, error=message)
                    )
                    await conn.execute(update(event_table).where(event_table.c.id == event.id).values(values))
        except Exception:
            # The database itself is failing: the lease expires and the events are claimed again.
            log.exception("could not record the failure; the lease will expire and retry")
            return
        for event in events:
            _count_applied(event, "failed" if event.attempts >= MAX_ATTEMPTS else "retried")


def _count_applied(event: Claimed, outcome: str) -> None:
    WEBHOOKS_APPLIED.labels(event.type if event.type in HANDLED else "other", outcome).inc()


async def requeue(
    database: Database, *, event_id: str | None = None, failed: bool = False, now: datetime
) -> int:
    """Make events due again for `billing events replay`: one by id, or every failed one."""
    condition = (
        event_table.c.id == event_id
        if event_id is not None
        else event_table.c.status == EventStatus.FAILED.value
    )
    if event_id is None and not failed:
        return 0
    async with database.write() as conn:
        result = await conn.execute(
            update(event_table)
            .where(condition)
            .values(status=EventStatus.PENDING.value, next_attempt_at=now, lease_expires_at=None, attempts=0)
        )
    return int(result.rowcount)
