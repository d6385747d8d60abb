"""The service's Prometheus metrics (docs/operations.md lists them with their labels).

The counters, histograms and live gauges are prometheus-client metrics in the default registry,
incremented where things happen. Under `billing serve --workers N` the service runs them in
prometheus-client's multiprocess mode (`PROMETHEUS_MULTIPROC_DIR`, set before the workers
start), so a scrape of any worker shows the whole service; the gauges are `livesum` (a dead
worker's share is dropped).

The values read from the database (`DatabaseGauges`) are not kept here: the scrape handler reads
them once per scrape (cached a few seconds) and serves them from a collector of its own, since
ordinary collectors are not aggregated across processes. Every replica reports the same values,
so alert rules aggregate them with `max`.

Label values are bounded by the code: operation names are the `what=` of `StripeGateway.call`,
event types outside the handled list are `other`, outcomes and reasons are fixed words.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy import CompoundSelect, Label, String, and_, func, literal, null, or_, select, union_all

from db.engine import Database
from db.enums import EventStatus
from db.health import DatabaseNotReady, ensure_ready
from db.models import (
    HostEventStatus,
    UsageReportStatus,
    account_table,
    event_table,
    host_endpoint_table,
    host_event_table,
    report_table,
    usage_table,
)

# GraphQL (graph/view.py) ---------------------------------------------------------------------

GRAPHQL_REQUESTS = Counter(
    "billing_graphql_requests",
    "GraphQL operations, by type, first root field and outcome (ok or the first error's code).",
    ["operation_type", "root_field", "outcome"],
)
GRAPHQL_DURATION = Histogram(
    "billing_graphql_request_duration_seconds",
    "Time to answer a GraphQL request over HTTP, by operation type.",
    ["operation_type"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)

# Webhooks (graph/webhooks.py, billing/webhooks.py) -------------------------------------------

WEBHOOKS_RECEIVED = Counter(
    "billing_webhook_events_received",
    "Webhook deliveries: new (stored), duplicate (already stored) or rejected (bad signature or body).",
    ["outcome"],
)
WEBHOOKS_APPLIED = Counter(
    "billing_webhook_events_applied",
    "Stored events the worker settled or retried, by event type (`other` outside the handled list).",
    ["event_type", "outcome"],
)

# Stripe (billing/stripe_gateway.py) ----------------------------------------------------------

STRIPE_REQUESTS = Counter(
    "billing_stripe_requests",
    "Calls to Stripe through the gateway, by operation and outcome.",
    ["operation", "outcome"],
)
STRIPE_DURATION = Histogram(
    "billing_stripe_request_duration_seconds",
    "Time of one gateway call to Stripe, its retries included.",
    ["operation"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
STRIPE_RETRIES = Counter(
    "billing_stripe_retries",
    "Retries of Stripe calls made by the gateway, by reason.",
    ["reason"],
)

# Usage and real time -------------------------------------------------------------------------

USAGE_RECORDS = Counter("billing_usage_records", "Usage records stored (recordUsage, not replays).")
REALTIME_CONNECTIONS = Gauge(
    "billing_realtime_connections",
    "Open GraphQL websockets.",
    multiprocess_mode="livesum",
)
REALTIME_SUBSCRIPTIONS = Gauge(
    "billing_realtime_subscriptions",
    "Live subscription-state watchers (GraphQL subscriptions being served).",
    multiprocess_mode="livesum",
)

ACCOUNT_CACHE_LOOKUPS = Counter(
    "billing_account_cache_lookups",
    "Account-state lookups of GraphQL requests, answered from the cache (hit) or read (miss).",
    ["result"],
)
ACCOUNT_CACHE_LIVE = Gauge(
    "billing_account_cache_live",
    "1 while the process's account cache is served (its LISTEN connection is up), else 0.",
    multiprocess_mode="livemin",
)

_operation_labels: dict[str, str] = {}


def stripe_operation(what: str) -> str:
    """The label value of a gateway call's `what=` ("create checkout session" -> create_checkout_session)."""
    label = _operation_labels.get(what)
    if label is None:
        label = _operation_labels[what] = "_".join(what.lower().split())[:64] or "unknown"
    return label


# Read from the database at scrape time ---------------------------------------------------------

CACHE_SECONDS = 5.0
_PENDING_EVENTS = (EventStatus.PENDING.value, EventStatus.PROCESSING.value)
_PENDING_REPORTS = (UsageReportStatus.PENDING.value, UsageReportStatus.SENDING.value)
_FAILED_REPORTS = (UsageReportStatus.FAILED.value, UsageReportStatus.EXPIRED.value)
_PENDING_HOST_EVENTS = (HostEventStatus.PENDING.value, HostEventStatus.SENDING.value)


def _gauge_query() -> CompoundSelect[Any]:
    """One statement: (kind, status, tier, count, oldest) rows for every database gauge."""
    e, r, u, a = event_table.c, report_table.c, usage_table.c, account_table.c
    no_text = null().cast(String)
    no_time = null()

    def row(kind: str) -> Label[str]:
        return literal(kind, String).label("kind")

    inbox_pending = select(
        row("inbox_pending"),
        no_text.label("status"),
        no_text.label("tier"),
        func.count().label("n"),
        func.min(e.received_at).label("oldest"),
    ).where(e.status.in_(_PENDING_EVENTS))
    inbox_failed = select(row("inbox_failed"), no_text, no_text, func.count(), no_time).where(
        e.status == EventStatus.FAILED.value
    )
    reports_pending = select(row("usage_pending"), no_text, no_text, func.count(), no_time).where(
        r.status.in_(_PENDING_REPORTS)
    )
    reports_failed = select(row("usage_failed"), no_text, no_text, func.count(), no_time).where(
        r.status.in_(_FAILED_REPORTS)
    )
    # Records still on their way to Stripe: not aggregated yet, or in an aggregate being sent.
    # Those in a failed or expired aggregate are counted by usage_failed instead.
    unreported = (
        select(row("usage_unreported"), no_text, no_text, func.count(), func.min(u.recorded_at))
        .select_from(usage_table.outerjoin(report_table, u.report_id == r.id))
        .where(and_(u.reported_at.is_(None), or_(u.report_id.is_(None), r.status.in_(_PENDING_REPORTS))))
    )
    subscriptions = select(row("subscriptions"), a.status, a.tier, func.count(), no_time).group_by(
        a.status, a.tier
    )
    h = host_event_table.c
    host_pending = select(row("host_pending"), no_text, no_text, func.count(), func.min(h.created_at)).where(
        h.status.in_(_PENDING_HOST_EVENTS)
    )
    host_failed = select(row("host_failed"), no_text, no_text, func.count(), no_time).where(
        h.status == HostEventStatus.FAILED.value
    )
    host_disabled = select(row("host_disabled"), no_text, no_text, func.count(), no_time).where(
        host_endpoint_table.c.disabled_at.is_not(None)
    )
    return union_all(
        inbox_pending,
        inbox_failed,
        reports_pending,
        reports_failed,
        unreported,
        subscriptions,
        host_pending,
        host_failed,
        host_disabled,
    )


@dataclass
class GaugeSnapshot:
    """The database's gauges at `read_at` (time.time())."""

    ready: bool
    read_at: float
    counts: dict[str, int] = field(default_factory=dict)
    oldest: dict[str, datetime | None] = field(default_factory=dict)
    subscriptions: dict[tuple[str, str], int] = field(default_factory=dict)

    def age(self, kind: str) -> float:
        oldest = self.oldest.get(kind)
        return max(0.0, self.read_at - oldest.timestamp()) if oldest is not None else 0.0


class DatabaseGauges:
    """Reads the gauges once, at most every `cache_seconds`, for every scrape of one process."""

    def __init__(self, database: Database, *, cache_seconds: float = CACHE_SECONDS) -> None:
        self.database = database
        self.cache_seconds = cache_seconds
        self._snapshot: GaugeSnapshot | None = None
        self._lock = asyncio.Lock()
        self._query = _gauge_query()

    async def read(self) -> GaugeSnapshot:
        async with self._lock:
            cached = self._snapshot
            if cached is not None and time.time() - cached.read_at < self.cache_seconds:
                return cached
            self._snapshot = await self._read()
            return self._snapshot

    async def _read(self) -> GaugeSnapshot:
        now = time.time()
        try:
            await ensure_ready(self.database.engine)
        except DatabaseNotReady:
            return GaugeSnapshot(ready=False, read_at=now)
        snapshot = GaugeSnapshot(ready=True, read_at=now)
        try:
            async with self.database.engine.connect() as conn:
                rows = (await conn.execute(self._query)).all()
        except Exception:  # the database went away between the two: report it as not ready
            return GaugeSnapshot(ready=False, read_at=now)
        for kind, status, tier, count, oldest in rows:
            if kind == "subscriptions":
                snapshot.subscriptions[(status, tier)] = int(count)
            else:
                snapshot.counts[kind] = int(count)
                snapshot.oldest[kind] = oldest
        return snapshot


class SnapshotCollector:
    """A collector serving one `GaugeSnapshot` (the scrape handler registers it for one scrape)."""

    def __init__(self, snapshot: GaugeSnapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        return list(self._metrics())

    def _metrics(self) -> Iterator[Metric]:
        s = self.snapshot
        yield GaugeMetricFamily(
            "billing_ready", "1 when the database is reachable and migrated, else 0.", value=int(s.ready)
        )
        if not s.ready:
            return
        simple = (
            ("billing_webhook_inbox_pending", "Stored webhook events not applied yet.", "inbox_pending"),
            ("billing_webhook_inbox_failed", "Webhook events that failed for good.", "inbox_failed"),
            ("billing_usage_report_pending", "Usage aggregates waiting for Stripe.", "usage_pending"),
            ("billing_usage_report_failed", "Usage aggregates failed or expired.", "usage_failed"),
            ("billing_host_events_pending", "Events for the host app not delivered yet.", "host_pending"),
            ("billing_host_events_failed", "Events for the host app that failed for good.", "host_failed"),
            (
                "billing_host_endpoint_disabled",
                "1 while the host app's endpoint answered 410 Gone (deliveries stopped until a replay).",
                "host_disabled",
            ),
        )
        for name, documentation, kind in simple:
            yield GaugeMetricFamily(name, documentation, value=s.counts.get(kind, 0))
        yield GaugeMetricFamily(
            "billing_webhook_inbox_oldest_pending_age_seconds",
            "Age of the oldest webhook event not applied yet (0 when none).",
            value=s.age("inbox_pending"),
        )
        yield GaugeMetricFamily(
            "billing_host_events_oldest_pending_age_seconds",
            "Age of the oldest event for the host app not delivered yet (0 when none).",
            value=s.age("host_pending"),
        )
        yield GaugeMetricFamily(
            "billing_usage_oldest_unreported_age_seconds",
            "Age of the oldest usage record not reported to Stripe yet (0 when none).",
            value=s.age("usage_unreported"),
        )
        subscriptions = GaugeMetricFamily(
            "billing_subscriptions",
            "Billing accounts by subscription status and tier.",
            labels=["status", "tier"],
        )
        for (status, tier), count in sorted(s.subscriptions.items()):
            subscriptions.add_metric([status, tier], count)
        yield subscriptions
