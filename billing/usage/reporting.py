"""Reporting usage to Stripe Billing Meters: durable, asynchronous, exactly once.

Records of metered features (`[metered.<feature>]` in the plans file) reach Stripe as meter
events, in two claimed steps, so several processes can drain at once (the service's background
task, `billing usage report` from cron):

1. **Aggregate.** Records not yet aggregated are claimed (`FOR UPDATE SKIP LOCKED` on
   PostgreSQL; on SQLite the write transaction is `BEGIN IMMEDIATE`, one writer at a time) and
   summed per customer, meter and minute into `usage_report` rows, in the same transaction that
   sets each record's `report_id`. An aggregate's id is its meter event `identifier`, fixed
   before anything is sent, so every retry sends the same one. A minute holding a monthly
   boundary counted from the account's period start (the period start itself; on an annual
   plan also each month's, where its monthly metered item is invoiced) is split at that
   instant, so usage lands in the right invoice.
2. **Send.** Due aggregates are claimed with a lease (`status = sending`, `attempts + 1`) and
   sent outside any transaction. Only after Stripe accepts one are it and its records marked
   reported. A lost response leaves it `sending`; when its lease expires it is sent again with
   the same identifier, and Stripe's answer for a known identifier (`resource_already_exists`)
   means "already recorded": it is marked reported, never counted twice. Stripe only
   deduplicates identifiers for about 24 hours, so the statuses, not Stripe, carry
   exactly-once beyond that: a reported aggregate is never sent again, and a drainer whose
   lease was taken over cannot put it back (outcome updates name the claim's attempt).

Stripe being unavailable ends the pass (the rest of the batch is released untouched) and the
aggregate retries with backoff (1 s, 2 s, ... 10 min), for as long as Stripe's 35-day window
allows. Refusals (a missing meter or customer, ...) retry too and are `failed` after
`MAX_ATTEMPTS`. An aggregate whose timestamp is about to leave the 35-day window is `expired`.
Failed and expired aggregates are flagged, never dropped: `billing usage report` lists them
(with the ones getting close to the window's end) and `--retry-failed` queues failed ones again.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import stripe
from sqlalchemy import and_, func, or_, select, update

from billing.background import BackgroundWorker
from billing.clock import Clock, utcnow
from billing.errors import BillingError, ErrorCode
from billing.plans import Catalog
from billing.stripe_gateway import StripeGateway, idempotency_key
from billing.usage.windows import monthly_window
from billing.work_queue import LeasedQueue, release_on_shutdown
from db.engine import Database
from db.models import UsageReportStatus, account_table, report_table, usage_table

log = logging.getLogger("billing.usage")

LEASE = timedelta(minutes=5)
# Aggregates wait as `pending`, are `sending` while a reporter holds them.
AGGREGATES = LeasedQueue(
    report_table, UsageReportStatus.PENDING.value, UsageReportStatus.SENDING.value, LEASE
)
MAX_ATTEMPTS = 12  # refusals; an outage retries until the window closes
STRIPE_WINDOW = timedelta(days=35)  # meter events older than this are refused
EXPIRY_MARGIN = timedelta(minutes=10)  # do not send what would arrive out of the window
AT_RISK_AGE = timedelta(days=30)  # unreported this long: listed as at risk
MINUTE = timedelta(minutes=1)


def new_report_id() -> str:
    return f"ur_{uuid.uuid4().hex}"


def month_boundary(minute: datetime, period_start: datetime | None) -> datetime | None:
    """The boundary inside `minute` of the months counted from `period_start`, if one is there.

    Metered prices are monthly on every plan and invoiced at those boundaries (an annual plan's
    subscription mixes intervals), so usage on either side of one belongs to different invoices.
    """
    if period_start is None:
        return None
    start = monthly_window(period_start, minute + MINUTE - timedelta(microseconds=1)).start
    return start if start >= minute else None


def minute_of(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(second=0, microsecond=0)


class Outcome(StrEnum):
    SENT = "sent"
    ALREADY_RECORDED = "already_recorded"
    UNAVAILABLE = "unavailable"
    REFUSED = "refused"
    EXPIRED = "expired"
    SKIPPED = "skipped"  # not tried: Stripe was down earlier in the batch


@dataclass
class ReportPass:
    """What a drain did."""

    records: int = 0  # records aggregated
    aggregates: int = 0  # usage_report rows created
    sent: int = 0
    already_recorded: int = 0
    retrying: int = 0
    failed: int = 0
    expired: int = 0
    unavailable: bool = False
    errors: list[str] = field(default_factory=list)

    def add(self, other: ReportPass) -> None:
        self.records += other.records
        self.aggregates += other.aggregates
        self.sent += other.sent
        self.already_recorded += other.already_recorded
        self.retrying += other.retrying
        self.failed += other.failed
        self.expired += other.expired
        self.unavailable = self.unavailable or other.unavailable
        self.errors.extend(other.errors)

    @property
    def idle(self) -> bool:
        return (
            self.records + self.sent + self.already_recorded + self.retrying + self.failed + self.expired == 0
        )


@dataclass(frozen=True)
class ClaimedReport:
    id: str
    account_id: int
    event_name: str
    stripe_customer_id: str | None
    event_time: datetime
    quantity: int
    attempts: int


@dataclass(frozen=True)
class FlaggedReport:
    """An aggregate that needs a person: Stripe will not take it, or may not in time."""

    id: str
    user_id: str
    feature: str
    minute: datetime
    quantity: int
    status: str
    attempts: int
    last_error: str | None
    at_risk: bool  # still being retried, but close to Stripe's 35-day limit


class _AlreadyRecorded:
    """Stripe answered `resource_already_exists` for the identifier."""


class UsageReporter(BackgroundWorker):
    """Aggregates usage records and reports them to Stripe's meters. One per process."""

    name = "usage reporter"

    def __init__(
        self,
        *,
        database: Database,
        gateway: StripeGateway,
        catalog: Catalog,
        clock: Clock = utcnow,
        batch_size: int = 500,
        poll_seconds: float = 10.0,
        concurrency: int = 8,
    ) -> None:
        super().__init__(poll_seconds=poll_seconds)
        self.database = database
        self.gateway = gateway
        self.catalog = catalog
        self.clock = clock
        self.batch_size = batch_size
        self.concurrency = concurrency

    async def drain(
        self, *, max_batches: int = 10_000, progress: Callable[[ReportPass], None] | None = None
    ) -> ReportPass:
        """Aggregate and send everything due now; stops early while Stripe is unavailable."""
        total = ReportPass()
        for _ in range(max_batches):
            batch = ReportPass()
            batch.records, batch.aggregates = await self.aggregate()
            claimed = await self.claim()
            if claimed:
                try:
                    batch.add(await self.send(claimed))
                except asyncio.CancelledError:
                    # Shutting down: unsettled aggregates go back at once. One Stripe accepted
                    # but we did not record is sent again and answered "already recorded".
                    claims = [(report.id, report.attempts) for report in claimed]
                    await release_on_shutdown(AGGREGATES, self.database, claims, self.clock)
                    raise
            total.add(batch)
            if progress is not None and not batch.idle:
                progress(batch)
            if batch.unavailable or (batch.records == 0 and not claimed):
                break
        return total

    # Step 1: aggregate ------------------------------------------------------------------

    def _unaggregated(self) -> Any:
        u = usage_table.c
        return u.report_id.is_(None) & u.feature.in_(sorted(self.catalog.meters))

    async def aggregate(self) -> tuple[int, int]:
        """Turn up to `batch_size` records into aggregates; (records, aggregates)."""
        if not self.catalog.meters:
            return 0, 0
        u = usage_table.c
        if self.database.is_sqlite and not await self._any(select(u.id).where(self._unaggregated())):
            return 0, 0  # idle: do not take SQLite's write lock
        query = (
            select(u.id, u.account_id, u.feature, u.quantity, u.recorded_at)
            .where(self._unaggregated())
            .order_by(u.id)
            .limit(self.batch_size)
        )
        if self.database.is_postgres:
            query = query.with_for_update(skip_locked=True)
        now = self.clock()
        async with self.database.write() as conn:
            records = list(await conn.execute(query))
            if not records:
                return 0, 0
            a = account_table.c
            accounts = {
                row.id: row
                for row in await conn.execute(
                    select(a.id, a.stripe_customer_id, a.current_period_start).where(
                        a.id.in_({record.account_id for record in records})
                    )
                )
            }
            groups: dict[tuple[int, str, datetime, bool], list[Any]] = {}
            for record in records:
                minute = minute_of(record.recorded_at)
                boundary = month_boundary(minute, accounts[record.account_id].current_period_start)
                after_boundary = (
                    boundary is not None
                    and minute <= boundary < minute + MINUTE
                    and record.recorded_at >= boundary
                )
                groups.setdefault((record.account_id, record.feature, minute, after_boundary), []).append(
                    record
                )
            reports = []
            members: dict[str, list[int]] = {}
            for (account_id, feature, minute, _after), group in groups.items():
                report_id = new_report_id()
                members[report_id] = [record.id for record in group]
                reports.append(
                    {
                        "id": report_id,
                        "account_id": account_id,
                        "feature": feature,
                        "event_name": self.catalog.meters[feature].event_name,
                        "stripe_customer_id": accounts[account_id].stripe_customer_id,
                        "minute": minute,
                        # Stripe's timestamps are whole seconds; the earliest keeps every record
                        # of the aggregate on its side of a period boundary.
                        "event_time": min(record.recorded_at for record in group).replace(microsecond=0),
                        "quantity": sum(int(record.quantity) for record in group),
                        "status": UsageReportStatus.PENDING.value,
                        "attempts": 0,
                        "next_attempt_at": now,
                        "created_at": now,
                    }
                )
            await conn.execute(report_table.insert().values(reports))
            for report_id, record_ids in members.items():
                await conn.execute(
                    update(usage_table).where(usage_table.c.id.in_(record_ids)).values(report_id=report_id)
                )
        return len(records), len(reports)

    # Step 2: send -----------------------------------------------------------------------

    async def claim(self) -> list[ClaimedReport]:
        """Claim up to `batch_size` due aggregates with a lease."""
        r = report_table.c
        rows = await AGGREGATES.claim(
            self.database,
            now=self.clock(),
            limit=self.batch_size,
            order_by=[r.minute, r.id],
            returning=[
                r.id,
                r.account_id,
                r.event_name,
                r.stripe_customer_id,
                r.event_time,
                r.quantity,
                r.attempts,
            ],
        )
        claimed = [
            ClaimedReport(
                row.id,
                row.account_id,
                row.event_name,
                row.stripe_customer_id,
                row.event_time,
                int(row.quantity),
                row.attempts,
            )
            for row in rows
        ]
        return sorted(claimed, key=lambda report: (report.event_time, report.id))

    async def send(self, reports: list[ClaimedReport]) -> ReportPass:
        """Send claimed aggregates (a few at a time) and record each outcome."""
        result = ReportPass()
        down = asyncio.Event()
        gate = asyncio.Semaphore(self.concurrency)

        async def one(report: ClaimedReport) -> None:
            async with gate:
                if down.is_set():
                    outcome, error = Outcome.SKIPPED, None
                else:
                    outcome, error = await self._attempt(report)
                    if outcome is Outcome.UNAVAILABLE:
                        down.set()
                await self._settle(report, outcome, error, result)

        await asyncio.gather(*(one(report) for report in reports))
        result.unavailable = down.is_set()
        return result

    async def _attempt(self, report: ClaimedReport) -> tuple[Outcome, str | None]:
        now = self.clock()
        if report.event_time < now - STRIPE_WINDOW + EXPIRY_MARGIN:
            return Outcome.EXPIRED, "older than Stripe's 35-day meter event window"
        customer = report.stripe_customer_id or await self._customer_of(report.account_id)
        if customer is None:
            return Outcome.REFUSED, "the account has no Stripe customer"
        try:
            answer = await self.create_meter_event(report, customer)
        except BillingError as exc:
            stripe_code = exc.extensions.get("stripe_code")
            if stripe_code == "timestamp_too_far_in_past":
                return Outcome.EXPIRED, "Stripe refused it: older than the 35-day meter event window"
            if exc.code is ErrorCode.BILLING_PROVIDER_UNAVAILABLE:
                return Outcome.UNAVAILABLE, exc.message
            return Outcome.REFUSED, f"{exc.message} ({stripe_code or exc.code.value})"
        if isinstance(answer, _AlreadyRecorded):
            return Outcome.ALREADY_RECORDED, None
        return Outcome.SENT, None

    async def create_meter_event(self, report: ClaimedReport, customer: str) -> object:
        """One meter event; `_AlreadyRecorded` when Stripe already has its identifier."""
        params: Any = {
            "event_name": report.event_name,
            "identifier": report.id,
            "timestamp": int(report.event_time.timestamp()),
            "payload": {"stripe_customer_id": customer, "value": str(report.quantity)},
        }

        async def operation(options: Any) -> object:
            try:
                return await self.gateway.v1.billing.meter_events.create_async(params, options)
            except stripe.InvalidRequestError as exc:
                if exc.code == "resource_already_exists":
                    return _AlreadyRecorded()
                raise

        # A new idempotency key per claim: a resend after a lost response is deduplicated by
        # the identifier (resource_already_exists), the one mechanism, whatever the SDK did.
        return await self.gateway.call(
            operation,
            idempotency_key=idempotency_key("usage.meter_event", report.id, report.attempts),
            what="report usage to a Stripe meter",
        )

    async def _settle(
        self, report: ClaimedReport, outcome: Outcome, error: str | None, result: ReportPass
    ) -> None:
        now = self.clock()
        r = report_table.c
        mine = and_(
            r.id == report.id, r.attempts == report.attempts, r.status == UsageReportStatus.SENDING.value
        )
        async with self.database.write() as conn:
            if outcome in (Outcome.SENT, Outcome.ALREADY_RECORDED):
                # Stripe has it, whoever holds the claim now: always mark it (and its records).
                await conn.execute(
                    update(report_table)
                    .where(r.id == report.id)
                    .values(AGGREGATES.settle(UsageReportStatus.REPORTED.value, reported_at=now))
                )
                await conn.execute(
                    update(usage_table)
                    .where(usage_table.c.report_id == report.id, usage_table.c.reported_at.is_(None))
                    .values(reported_at=now)
                )
                if outcome is Outcome.SENT:
                    result.sent += 1
                else:
                    log.info("usage aggregate %s was already recorded by Stripe", report.id)
                    result.already_recorded += 1
                return
            if outcome is Outcome.SKIPPED:
                # Not tried: the claim is given back, its attempt not counted.
                await conn.execute(
                    update(report_table)
                    .where(mine)
                    .values(
                        {
                            **AGGREGATES.retry_later(attempts=1, now=now, error=None),
                            "attempts": r.attempts - 1,
                        }
                    )
                )
                result.retrying += 1
                return
            assert error is not None
            if outcome is Outcome.EXPIRED:
                status = UsageReportStatus.EXPIRED
                log.error("usage aggregate %s expired unreported: %s", report.id, error)
                result.expired += 1
            elif outcome is Outcome.REFUSED and report.attempts >= MAX_ATTEMPTS:
                status = UsageReportStatus.FAILED
                log.error("usage aggregate %s failed for good: %s", report.id, error)
                result.failed += 1
            else:
                status = UsageReportStatus.PENDING
                log.warning(
                    "usage aggregate %s not reported (attempt %d): %s", report.id, report.attempts, error
                )
                result.retrying += 1
            result.errors.append(f"{report.id}: {error}")
            values = (
                AGGREGATES.retry_later(attempts=report.attempts, now=now, error=error)
                if status is UsageReportStatus.PENDING
                else AGGREGATES.settle(status.value, error=error)
            )
            await conn.execute(update(report_table).where(mine).values(values))

    # Helpers and listings ---------------------------------------------------------------

    async def _any(self, query: Any) -> bool:
        async with self.database.read() as conn:
            return (await conn.execute(query.limit(1))).first() is not None

    async def _customer_of(self, account_id: int) -> str | None:
        async with self.database.read() as conn:
            found = await conn.execute(
                select(account_table.c.stripe_customer_id).where(account_table.c.id == account_id)
            )
            return found.scalar()


async def flagged_reports(database: Database, *, now: datetime, limit: int = 100) -> list[FlaggedReport]:
    """Failed and expired aggregates, and unreported ones close to Stripe's 35-day limit."""
    r, a = report_table.c, account_table.c
    open_statuses = [UsageReportStatus.PENDING.value, UsageReportStatus.SENDING.value]
    flagged = [UsageReportStatus.FAILED.value, UsageReportStatus.EXPIRED.value]
    query = (
        select(r.id, a.user_id, r.feature, r.minute, r.quantity, r.status, r.attempts, r.last_error)
        .join(account_table, a.id == r.account_id)
        .where(
            or_(
                r.status.in_(flagged),
                and_(r.status.in_(open_statuses), r.event_time < now - AT_RISK_AGE),
            )
        )
        .order_by(r.minute, r.id)
        .limit(limit)
    )
    async with database.read() as conn:
        rows = await conn.execute(query)
        return [
            FlaggedReport(
                row.id,
                row.user_id,
                row.feature,
                row.minute,
                int(row.quantity),
                row.status,
                row.attempts,
                row.last_error,
                row.status in open_statuses,
            )
            for row in rows
        ]


async def retry_failed(database: Database, *, now: datetime, report_id: str | None = None) -> int:
    """Queue failed aggregates (or the one `report_id`, if failed) again, after fixing what Stripe
    refused; returns how many."""
    r = report_table.c
    condition = r.status == UsageReportStatus.FAILED.value
    if report_id is not None:
        condition = and_(condition, r.id == report_id)
    async with database.write() as conn:
        result = await conn.execute(
            update(report_table)
            .where(condition)
            .values(status=UsageReportStatus.PENDING.value, attempts=0, next_attempt_at=now, last_error=None)
        )
    return int(result.rowcount)


async def unreported_count(database: Database) -> int:
    """Aggregates not yet accepted by Stripe and still being tried."""
    r = report_table.c
    async with database.read() as conn:
        found = await conn.execute(
            select(func.count())
            .select_from(report_table)
            .where(r.status.in_([UsageReportStatus.PENDING.value, UsageReportStatus.SENDING.value]))
        )
        return int(found.scalar() or 0)
