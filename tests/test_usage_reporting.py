"""Reporting usage to the sandbox's Stripe meters: outages, lost responses, concurrent drainers,
the window's end, the invoice, the background task and the `billing usage report` command."""

from __future__ import annotations

import asyncio
import os
import sys
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select, update

from billing.access import add_months
from billing.stripe_gateway import StripeGateway
from billing.usage import UsageInput, record_usage
from billing.usage.reporting import (
    ClaimedReport,
    UsageReporter,
    flagged_reports,
)
from db.engine import Database
from db.models import account_table, usage_table
from tests.billing_flows import advance, settle, setup_catalog, subscribe, wait_for_account
from tests.conftest import DbTarget, Service, running_service
from tests.gateways import SHORT_RETRIES, sandbox_gateway
from tests.graphql_support import SERVICE_KEY
from tests.usage_flows import (
    CATALOG,
    Clock,
    metered_subscriber,
    report_rows,
    sandbox_meter_events,
    spread_usage,
    unreported_records,
)

EVENT_NAME = CATALOG.meters["api_calls"].event_name
BILLING = str(Path(sys.executable).with_name("billing"))


@pytest.fixture
async def metered(database: Database, sandbox_db: DbTarget) -> AsyncIterator[Service]:
    """The service in sandbox mode, without its own reporter: the tests drive reporters."""
    async with running_service(database, sandbox_db, usage_reporter=False) as service:
        yield service


def gateway_for(service: Service) -> StripeGateway:
    return sandbox_gateway(service.url, **SHORT_RETRIES)  # one SDK retry: two requests per call


@pytest.fixture
async def gateway(metered: Service) -> AsyncIterator[StripeGateway]:
    gateway = gateway_for(metered)
    try:
        yield gateway
    finally:
        await gateway.close()


async def annual_metered_subscriber(
    service: Service, gateway: StripeGateway, prices: dict[str, str], user_id: str
) -> tuple[str, str]:
    """A paid starter annual checkout with the monthly metered price, as ours makes it (flexible
    billing mode mixes the intervals); (customer, subscription)."""
    customer_id, subscription_id = await subscribe(
        service,
        gateway,
        prices,
        user_id,
        "starter_annual",
        trial_days=None,
        metered=("starter_api_calls_metered",),
    )
    await wait_for_account(
        service.database, user_id, status="active", interval="annual", stripe_customer_id=customer_id
    )
    return customer_id, subscription_id


async def fault(service: Service, status: int, count: int, *, after_apply: bool = False) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"{service.url}/sandbox/_control/faults",
            json={
                "path_prefix": "/v1/billing/meter_events",
                "status": status,
                "count": count,
                "after_apply": after_apply,
            },
        )
    assert response.status_code == 200, response.text


async def summary(gateway: StripeGateway, customer_id: str, start: datetime, end: datetime) -> float:
    meters = await gateway.v1.billing.meters.list_async({"status": "active"})
    meter = next(m for m in meters.data if m.event_name == EVENT_NAME)
    low = int(start.timestamp()) // 60 * 60
    high = int(end.timestamp()) // 60 * 60 + 60
    found = await gateway.v1.billing.meters.event_summaries.list_async(
        meter.id, {"customer": customer_id, "start_time": low, "end_time": high}
    )
    return float(found.data[0].aggregated_value)


# An outage in the middle ---------------------------------------------------------------------


async def test_an_outage_mid_drain_loses_nothing_and_reports_nothing_twice(
    metered: Service, gateway: StripeGateway
) -> None:
    prices = await setup_catalog(gateway)
    customers = {
        user: (await metered_subscriber(metered, gateway, prices, user))[0] for user in ("ada", "bob")
    }
    start = datetime.now(UTC)
    totals = await spread_usage(metered.database, ["ada", "bob"], 6, start)  # 12 aggregates
    clock = Clock()
    reporter = UsageReporter(
        database=metered.database, gateway=gateway, catalog=CATALOG, clock=clock, batch_size=3, concurrency=1
    )
    while (await reporter.aggregate())[0]:
        pass
    assert len(await report_rows(metered.database)) == 12

    first = await reporter.drain(max_batches=1)
    assert first.sent == 3

    await fault(metered, 500, 4)  # two calls' worth (the SDK retries once)
    down = await reporter.drain(max_batches=5)
    assert down.unavailable and down.sent == 0 and down.retrying == 3  # the pass stopped at once
    (failed,) = [row for row in await report_rows(metered.database) if row.last_error]
    assert failed.attempts == 1 and failed.status == "pending"
    assert failed.next_attempt_at > clock()  # it backs off

    still_down = await reporter.drain(max_batches=1)  # others are due; Stripe is still down
    assert still_down.unavailable and still_down.sent == 0
    assert [row.attempts for row in await report_rows(metered.database) if row.id == failed.id] == [1]

    clock.advance(minutes=1)
    back = await reporter.drain(max_batches=1)
    assert back.sent == 3 and not back.unavailable

    await fault(metered, 500, 2, after_apply=True)  # Stripe records it, the response is lost
    lost = await reporter.drain(max_batches=1)
    assert lost.unavailable and lost.sent == 0

    clock.advance(minutes=1)
    rest = await reporter.drain()
    assert rest.already_recorded == 1  # resent with the same identifier: Stripe already had it
    assert rest.sent == 12 - 6 - 1 and not rest.unavailable

    reports = await report_rows(metered.database)
    assert len(reports) == 12 and {row.status for row in reports} == {"reported"}
    assert await unreported_records(metered.database) == 0
    events = await sandbox_meter_events(metered)
    identifiers = Counter(event["identifier"] for event in events)
    assert set(identifiers) == {row.id for row in reports} and set(identifiers.values()) == {1}
    for user, customer_id in customers.items():
        assert await summary(gateway, customer_id, start - timedelta(hours=1), start) == totals[user]


async def test_a_drainer_that_died_after_sending_is_taken_over_without_a_duplicate(
    metered: Service, gateway: StripeGateway
) -> None:
    prices = await setup_catalog(gateway)
    customer_id, _ = await metered_subscriber(metered, gateway, prices, "ada")
    now = datetime.now(UTC)
    await record_usage(
        database=metered.database,
        catalog=CATALOG,
        records=[UsageInput("ada", "api_calls", 42, "one")],
        now=now,
    )
    clock = Clock()
    dying = UsageReporter(database=metered.database, gateway=gateway, catalog=CATALOG, clock=clock)
    await dying.aggregate()
    (claimed,) = await dying.claim()
    await dying.create_meter_event(claimed, customer_id)  # accepted; then the process dies

    survivor = UsageReporter(database=metered.database, gateway=gateway, catalog=CATALOG, clock=clock)
    assert (await survivor.drain()).already_recorded == 0  # the lease still holds
    clock.advance(minutes=6)
    taken_over = await survivor.drain()
    assert (taken_over.sent, taken_over.already_recorded) == (0, 1)

    # The dead drainer's late word cannot put the aggregate back in the queue: it sends its claim
    # again, Stripe is down for both requests, and it records the attempt as unavailable.
    await fault(metered, 500, 2)
    assert (await dying.send([claimed])).unavailable
    (row,) = await report_rows(metered.database)
    assert row.status == "reported" and row.attempts == 2
    assert [event["identifier"] for event in await sandbox_meter_events(metered)] == [claimed.id]
    assert await summary(gateway, customer_id, now, now) == 42


async def test_two_drainers_at_once_report_every_aggregate_exactly_once(
    metered: Service, gateway: StripeGateway
) -> None:
    prices = await setup_catalog(gateway)
    customers = {
        user: (await metered_subscriber(metered, gateway, prices, user))[0] for user in ("u1", "u2", "u3")
    }
    start = datetime.now(UTC)
    totals = await spread_usage(metered.database, list(customers), 15, start)  # 45 aggregates
    sent: list[str] = []

    def counting(reporter: UsageReporter) -> UsageReporter:
        original = reporter.create_meter_event

        async def create(report: ClaimedReport, customer: str) -> object:
            sent.append(report.id)
            await asyncio.sleep(0.01)  # let the other drainer interleave
            return await original(report, customer)

        reporter.create_meter_event = create  # type: ignore[method-assign]
        return reporter

    other_database = Database(metered.database.engine)  # another pool user, as another process would be
    drainers = [
        counting(UsageReporter(database=db, gateway=gateway, catalog=CATALOG, batch_size=4, concurrency=2))
        for db in (metered.database, other_database)
    ]
    passes = await asyncio.gather(*(drainer.drain() for drainer in drainers))

    assert all(p.records > 0 for p in passes), "both drainers took part"
    assert sum(p.records for p in passes) == 45 and sum(p.aggregates for p in passes) == 45
    assert sum(p.sent for p in passes) == len(sent) and sum(p.already_recorded for p in passes) == 0
    assert set(Counter(sent).values()) == {1}  # no aggregate was sent twice
    reports = await report_rows(metered.database)
    assert {row.status for row in reports} == {"reported"} and set(sent) == {row.id for row in reports}
    assert sum(int(row.quantity) for row in reports) == sum(totals.values())
    assert await unreported_records(metered.database) == 0
    for user, customer_id in customers.items():
        assert await summary(gateway, customer_id, start - timedelta(hours=1), start) == totals[user]


# The 35-day window ---------------------------------------------------------------------------


async def test_usage_leaving_stripes_window_is_flagged_never_dropped(
    metered: Service, gateway: StripeGateway
) -> None:
    prices = await setup_catalog(gateway)
    await metered_subscriber(metered, gateway, prices, "ada")
    now = datetime.now(UTC)
    await record_usage(
        database=metered.database,
        catalog=CATALOG,
        records=[
            UsageInput("ada", "api_calls", 7, "old", now - timedelta(days=35) + timedelta(minutes=2)),
            UsageInput("ada", "api_calls", 9, "aging", now - timedelta(days=31)),
            UsageInput("ada", "api_calls", 3, "fresh", now),
        ],
        now=now,
    )
    reporter = UsageReporter(database=metered.database, gateway=gateway, catalog=CATALOG)
    await reporter.aggregate()
    aging = {item.quantity: item for item in await flagged_reports(metered.database, now=now)}
    assert set(aging) == {7, 9} and all(item.at_risk for item in aging.values())

    result = await reporter.drain()

    assert (result.expired, result.sent) == (1, 2)
    (flagged,) = await flagged_reports(metered.database, now=datetime.now(UTC))
    assert (flagged.quantity, flagged.status, flagged.user_id, flagged.at_risk) == (
        7,
        "expired",
        "ada",
        False,
    )
    assert "35-day" in (flagged.last_error or "")
    async with metered.database.read() as conn:
        kept = await conn.execute(
            select(usage_table.c.idempotency_key).where(usage_table.c.reported_at.is_(None))
        )
        assert list(kept.scalars()) == ["old"]  # still there, not reported, listed
    assert sorted(event["payload"]["value"] for event in await sandbox_meter_events(metered)) == ["3", "9"]


# The invoice ---------------------------------------------------------------------------------


async def test_recorded_usage_reaches_the_upcoming_invoice_through_the_background_reporter(
    database: Database, sandbox_db: DbTarget
) -> None:
    """recordUsage over GraphQL; the service's own reporter sends it; Stripe's preview bills it."""
    async with running_service(database, sandbox_db, service_api_key=SERVICE_KEY) as service:
        gateway = gateway_for(service)
        try:
            prices = await setup_catalog(gateway)
            _customer, subscription_id = await metered_subscriber(service, gateway, prices, "ada")
            async with httpx.AsyncClient() as client:
                response = await client.post(
                    f"{service.url}/graphql",
                    json={
                        "query": "mutation($input: RecordUsageInput!) { recordUsage(input: $input) { id } }",
                        "variables": {
                            "input": {
                                "userId": "ada",
                                "feature": "api_calls",
                                "quantity": 5000,
                                "idempotencyKey": "bulk",
                            }
                        },
                    },
                    headers={"Authorization": f"Bearer {SERVICE_KEY}"},
                )
            assert "errors" not in response.json(), response.text
            for _ in range(200):  # the mutation kicks the reporter; it sends within moments
                if not await unreported_records(database):
                    break
                await asyncio.sleep(0.1)
            assert await unreported_records(database) == 0, "the background reporter never sent it"
            await asyncio.sleep(1.1)  # the preview bills usage strictly before its `now` (whole seconds)

            preview = await gateway.v1.invoices.create_preview_async({"subscription": subscription_id})
        finally:
            await gateway.close()
    by_price = {
        line.pricing.price_details.price: line.amount
        for line in preview.lines.data
        if line.pricing is not None and line.pricing.price_details is not None
    }
    # 5,000 calls at the starter's 0.1 cent each, next to the next period's $29.
    assert by_price == {prices["starter_api_calls_metered"]: 500, prices["starter_monthly"]: 2900}
    assert preview.total == 3400


async def test_an_annual_subscriber_is_billed_for_metered_usage_every_month(
    metered: Service, gateway: StripeGateway
) -> None:
    """Annual plan, monthly metered price (flexible billing mode): the month's usage is invoiced
    at the month's end; the plan is billed again only at the year's end."""
    prices = await setup_catalog(gateway)
    _customer_id, subscription_id = await annual_metered_subscriber(metered, gateway, prices, "annie")
    subscription = await gateway.v1.subscriptions.retrieve_async(subscription_id)
    periods = {
        item.price.id: (item.current_period_start, item.current_period_end)
        for item in subscription["items"].data
    }
    year_start, year_end = periods[prices["starter_annual"]]
    month_end = periods[prices["starter_api_calls_metered"]][1]
    assert year_start < month_end < year_end

    await record_usage(
        database=metered.database,
        catalog=CATALOG,
        records=[UsageInput("annie", "api_calls", 5000, "annual-bulk")],
        now=datetime.now(UTC),
    )
    reporter = UsageReporter(database=metered.database, gateway=gateway, catalog=CATALOG, concurrency=1)
    assert (await reporter.drain()).sent == 1
    await asyncio.sleep(1.1)  # the preview bills usage strictly before its `now` (whole seconds)

    preview = await gateway.v1.invoices.create_preview_async({"subscription": subscription_id})
    by_price = {
        line.pricing.price_details.price: line.amount
        for line in preview.lines.data
        if line.pricing is not None and line.pricing.price_details is not None
    }
    # 5,000 calls at the starter's 0.1 cent each, due at the month's end; the plan renews in a year.
    assert by_price == {prices["starter_api_calls_metered"]: 500}
    assert (preview.total, preview.period_end) == (500, month_end)

    now = (await advance(metered, 0))["now"]
    await advance(metered, month_end + 3_600 + 60 - now)  # the month's invoice is charged an hour later
    invoices = await gateway.v1.invoices.list_async({"subscription": subscription_id, "limit": 100})
    (monthly,) = [invoice for invoice in invoices.data if invoice.billing_reason == "subscription_cycle"]
    assert [
        (line.pricing.price_details.price, line.amount)
        for line in monthly.lines.data
        if line.pricing is not None and line.pricing.price_details is not None
    ] == [(prices["starter_api_calls_metered"], 500)]  # the annual price is not billed again
    assert (monthly.status, monthly.amount_paid) == ("paid", 500)
    await settle(metered.url, metered.database)
    # The account keeps the plan's period: the year, not the metered item's new month.
    row = await wait_for_account(metered.database, "annie", status="active", interval="annual")
    assert (row.current_period_start, row.current_period_end) == (
        datetime.fromtimestamp(year_start, UTC),
        datetime.fromtimestamp(year_end, UTC),
    )


async def test_a_minute_holding_an_annual_plans_monthly_boundary_is_split_there(
    metered: Service, gateway: StripeGateway
) -> None:
    """Usage each side of the month's boundary belongs to different monthly invoices."""
    prices = await setup_catalog(gateway)
    await annual_metered_subscriber(metered, gateway, prices, "annie")
    await settle(metered.url, metered.database)
    now = datetime.now(UTC)
    boundary = now.replace(second=30, microsecond=0) - timedelta(minutes=3)  # a month after the start
    start = add_months(boundary, -1)
    async with metered.database.write() as conn:
        await conn.execute(
            update(account_table)
            .where(account_table.c.user_id == "annie")
            .values(current_period_start=start, current_period_end=add_months(start, 12))
        )
    records = [
        UsageInput("annie", "api_calls", 7, "before", boundary - timedelta(seconds=10)),
        UsageInput("annie", "api_calls", 11, "after", boundary + timedelta(seconds=10)),
    ]
    await record_usage(database=metered.database, catalog=CATALOG, records=records, now=now)

    reporter = UsageReporter(database=metered.database, gateway=gateway, catalog=CATALOG, concurrency=1)
    await reporter.aggregate()

    rows = sorted(await report_rows(metered.database), key=lambda row: row.event_time)
    assert [(row.minute, row.event_time, row.quantity) for row in rows] == [
        (boundary.replace(second=0), boundary - timedelta(seconds=10), 7),
        (boundary.replace(second=0), boundary + timedelta(seconds=10), 11),
    ]


# The command ---------------------------------------------------------------------------------


async def test_billing_usage_report_for_cron(
    metered: Service, gateway: StripeGateway, migrated_db: DbTarget
) -> None:
    if migrated_db.backend != "sqlite":
        pytest.skip("a separate process cannot use the test's PostgreSQL schema; SQLite covers the command")
    prices = await setup_catalog(gateway)
    customer_id, _ = await metered_subscriber(metered, gateway, prices, "ada")
    now = datetime.now(UTC)
    await record_usage(
        database=metered.database,
        catalog=CATALOG,
        records=[
            UsageInput("ada", "api_calls", 5, "a", now - timedelta(minutes=3)),
            UsageInput("ada", "api_calls", 6, "b", now - timedelta(minutes=2)),
            UsageInput("ada", "api_calls", 8, "too-old", now - timedelta(days=35) + timedelta(minutes=5)),
        ],
        now=now,
    )
    env = {**os.environ, "DATABASE_URL": migrated_db.url, "PUBLIC_BASE_URL": metered.url}

    async def run(*args: str) -> tuple[int, str, str]:
        process = await asyncio.create_subprocess_exec(
            BILLING,
            "usage",
            "report",
            *args,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode is not None
        return process.returncode, out.decode(), err.decode()

    await fault(metered, 500, 50)
    code, out, err = await run()
    assert code == 1, err
    assert "Stripe was unavailable" in out and "2 still to report" in out
    assert "3 record(s) aggregated into 3 meter event(s)" in err  # progress
    assert "attention:" in out and "too-old" not in out and "expired" in out and "user ada" in out

    async with httpx.AsyncClient() as client:
        await client.delete(f"{metered.url}/sandbox/_control/faults")
    await asyncio.sleep(1.2)  # the backoff after one failed attempt
    code, out, err = await run()
    assert code == 0, out + err
    assert "2 sent" in out and "0 still to report" in out
    assert "expired" in out  # still listed: never silently dropped
    assert await summary(gateway, customer_id, now - timedelta(minutes=5), now) == 11
