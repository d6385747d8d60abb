"""The billing ledger: every change of an account's billing state once, with its causes and
Stripe's time; replayed and duplicated events add nothing; nothing updates or deletes a row."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import DBAPIError

from billing.ledger import BILLING_SYNC, Cause, LedgerEntry, effective_at, record_change, transition_time
from billing.stripe_objects import stripe_time
from billing.webhooks import requeue
from db.engine import Database
from db.migrate import upgrade_engine
from db.models import event_table, ledger_table
from tests.billing_flows import (
    advance,
    advance_to,
    period_end,
    settle,
    subscribe,
    wait_for_account,
)
from tests.conftest import DbTarget
from tests.graphql_support import insert_account
from tests.live import Live, LiveOptions

DAY = 86_400
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["ordered", "shuffled_duplicated"])
def live_options(request: pytest.FixtureRequest) -> LiveOptions:
    return LiveOptions(delivery=str(request.param))


async def ledger_of(database: Database, user_id: str) -> list[LedgerEntry]:
    async with database.read() as conn:
        rows = (
            await conn.execute(
                select(ledger_table).where(ledger_table.c.user_id == user_id).order_by(ledger_table.c.id)
            )
        ).mappings()
        return [LedgerEntry(**row) for row in rows]


async def test_every_change_of_a_lifecycle_is_one_row_with_its_causes(live: Live) -> None:
    service, gateway, prices = live.service, live.gateway, live.prices
    _, subscription_id = await subscribe(service, gateway, prices, "led1", "pro_monthly")
    await wait_for_account(service.database, "led1", status="trialing")
    await settle(service.url, service.database)
    await advance(service, 15 * DAY)  # the trial ends: paid
    await wait_for_account(service.database, "led1", status="active")
    await settle(service.url, service.database)
    await gateway.v1.subscriptions.update_async(subscription_id, {"cancel_at_period_end": True})
    await wait_for_account(service.database, "led1", cancel_at_period_end=True)
    await settle(service.url, service.database)
    await advance_to(service, await period_end(gateway, subscription_id) + 60)
    await wait_for_account(service.database, "led1", status="canceled")
    await settle(service.url, service.database)

    entries = await ledger_of(service.database, "led1")
    steps = [
        (entry.before and entry.before["status"], entry.after["status"], entry.changed) for entry in entries
    ]
    assert [(before, after) for before, after, _ in steps] == [
        (None, "trialing"),
        ("trialing", "active"),
        ("active", "active"),
        ("active", "canceled"),
    ], steps
    assert entries[0].after | {"discounts": []} == entries[0].after
    assert (entries[0].after["tier"], entries[0].after["interval"]) == ("pro", "monthly")
    assert entries[0].after["stripe_price_id"] == prices["pro_monthly"]
    assert entries[0].after["quantity"] == 1 and entries[0].after["unit_amount"] == 9900
    assert entries[1].changed == ["status"]
    assert entries[2].changed == ["cancel_at_period_end"] and entries[2].after["cancel_at_period_end"]
    assert "status" in entries[3].changed

    async with service.database.read() as conn:  # the service's inbox: every event it received
        stored = (await conn.execute(select(event_table.c.id, event_table.c.payload))).all()
    events = {row.id: row.payload for row in stored}
    for entry in entries:
        assert entry.kind == "change" and entry.causes
        for cause in entry.causes:
            event = events[cause["id"]]  # a webhook event of the batch, by its id and type
            assert (cause["type"], cause["created"]) == (event["type"], event["created"])
    # When it happened at Stripe, not when it was applied: the subscription's own times of its
    # transitions, else the batch's latest event.
    final = await gateway.v1.subscriptions.retrieve_async(subscription_id)
    assert entries[0].effective_at == stripe_time(final.start_date)
    assert entries[1].effective_at == stripe_time(final.trial_end)
    assert entries[2].effective_at == stripe_time(max(cause["created"] for cause in entries[2].causes))
    assert entries[3].effective_at == stripe_time(final.ended_at or final.canceled_at)
    assert [entry.effective_at for entry in entries] == sorted(entry.effective_at for entry in entries)

    # Replaying every event (`billing events replay`) and a `billing sync` add no row.
    now = datetime.now(UTC)
    for event_id in events:
        await requeue(service.database, event_id=event_id, now=now)
    await settle(service.url, service.database)
    assert await ledger_of(service.database, "led1") == entries


async def test_a_mutation_and_billing_sync_are_causes(live: Live) -> None:
    from billing.notifier import LogNotifier
    from billing.reconcile import reconcile

    service, gateway, prices = live.service, live.gateway, live.prices
    customer_id, _ = await subscribe(service, gateway, prices, "led2", "starter_monthly", trial_days=None)
    await wait_for_account(service.database, "led2", status="active")
    await settle(service.url, service.database)
    before = await ledger_of(service.database, "led2")
    assert len(before) == 1

    cancel = "mutation { cancelSubscription { status cancelAtPeriodEnd } }"
    answer = await live.graphql("led2", cancel)
    assert "errors" not in answer, answer
    entries = await ledger_of(service.database, "led2")
    assert len(entries) == 2 and entries[1].changed == ["cancel_at_period_end"]
    # The mutation's own sync, unless the webhook it caused was applied first.
    causes = entries[1].causes
    assert causes == [{"type": "mutation"}] or all(cause["id"].startswith("evt_") for cause in causes)
    await settle(service.url, service.database)
    assert len(await ledger_of(service.database, "led2")) == 2  # the webhook that follows: no change

    report = await reconcile(
        database=service.database,
        gateway=gateway,
        notifier=LogNotifier(),
        customers=[customer_id],
        now=datetime.now(UTC),
    )
    assert report.results[0].ledger_rows == 0
    assert len(await ledger_of(service.database, "led2")) == 2


SOURCES = ("billing", "graph", "cli", "db", "stripe_sandbox")


def test_no_code_updates_or_deletes_a_ledger_row() -> None:
    writes = re.compile(
        r"\b(update|delete)\(\s*ledger_table|\b(UPDATE|DELETE\s+FROM)\s+billing_ledger\b", re.I
    )
    found = []
    for top in SOURCES:
        for path in (ROOT / top).rglob("*.py"):
            text = path.read_text()
            if "migrations" in path.parts:
                continue
            found += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in writes.finditer(text)]
    assert found == []


async def test_the_database_refuses_to_update_or_delete_a_row(database: Database) -> None:
    now = datetime.now(UTC)
    row: dict[str, Any] = {
        "account_id": 1,
        "user_id": "u",
        "kind": "change",
        "changed": ["status"],
        "before": None,
        "after": {"status": "active"},
        "causes": [{"type": "mutation"}],
        "effective_at": now,
        "recorded_at": now,
    }
    async with database.write() as conn:
        await conn.execute(insert(ledger_table).values(**row))
    for statement in (update(ledger_table).values(kind="initial"), delete(ledger_table)):
        with pytest.raises(DBAPIError, match="append-only"):
            async with database.write() as conn:
                await conn.execute(statement)
    async with database.read() as conn:
        assert len((await conn.execute(select(ledger_table))).all()) == 1


async def test_the_migration_backfills_one_initial_row_per_account(blank_db: DbTarget) -> None:
    db = blank_db.database()
    try:
        await upgrade_engine(db.engine, "0007")
        synced = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
        await insert_account(db, "old1", synced_at=synced, cancel_at_period_end=True)
        await insert_account(db, "old2", status="none", tier="none", interval=None)
        await upgrade_engine(db.engine)
        first, second = await ledger_of(db, "old1"), await ledger_of(db, "old2")
    finally:
        await db.dispose()
    assert [entry.kind for entry in first + second] == ["initial", "initial"]
    entry = first[0]
    assert entry.before is None and entry.changed == [] and entry.effective_at == synced
    assert entry.causes == [{"type": "migration", "id": "0008"}]
    assert entry.after["status"] == "active" and entry.after["tier"] == "pro"
    assert (
        entry.after["cancel_at_period_end"] is True and entry.after["stripe_price_id"] == "price_pro_monthly"
    )
    assert second[0].after["status"] == "none" and second[0].after["interval"] is None


def test_transition_times_come_from_the_subscription() -> None:
    day = timedelta(days=1)
    start = datetime(2026, 5, 1, tzinfo=UTC)
    moments = {
        "start_date": start,
        "trial_end": start + 14 * day,
        "canceled_at": start + 20 * day,
        "ended_at": start + 30 * day,
        "current_period_start": start + 14 * day,
    }
    assert transition_time({"status": (None, "trialing")}, moments) == start
    assert transition_time({"status": ("trialing", "active")}, moments) == start + 14 * day
    # First seen paying after a trial no sync saw: paying since the trial's end.
    assert transition_time({"status": (None, "active")}, moments) == start + 14 * day
    assert transition_time({"status": (None, "active")}, {**moments, "trial_end": None}) == start
    assert transition_time({"status": ("active", "canceled")}, moments) == start + 30 * day
    assert transition_time({"status": ("active", "past_due")}, moments) is None
    assert transition_time({"stripe_price_id": ("a", "b"), "current_period_start": (0, 1)}, moments) == (
        start + 14 * day
    )
    assert transition_time({"cancel_at_period_end": (False, True)}, moments) is None
    late = [Cause("invoice.paid", "evt_2", 2_000_000_000), Cause("invoice.created", "evt_1", 1_900_000_000)]
    assert effective_at(late, {"cancel_at_period_end": (False, True)}, moments, start) == stripe_time(
        2_000_000_000
    )
    assert effective_at([Cause("mutation")], {}, moments, start) == start
    # A price changed and billed at once (an upgrade): the update's invoice, not the sync's clock.
    billed = {**moments, "updated_by_invoice": start + 9 * day}
    assert transition_time({"stripe_price_id": ("a", "b")}, billed) == start + 9 * day
    assert transition_time({"stripe_price_id": ("a", "b")}, moments) is None


async def test_learning_discount_terms_is_not_a_change_on_its_own(database: Database) -> None:
    now = datetime.now(UTC)
    terms = {"id": "di_1", "coupon": "c", "percent_off": 20.0, "duration": "forever", "end": None}

    async def record(discounts: list[Any], changes: dict[str, tuple[Any, Any]]) -> bool:
        async with database.write() as conn:
            return await record_change(
                conn,
                account_id=7,
                user_id="u7",
                customer_id="cus_7",
                before={"status": "active"},
                changes=changes,
                stripe_values={"quantity": 1, "unit_amount": 2900, "currency": "usd", "discounts": discounts},
                causes=[Cause(BILLING_SYNC)],
                effective=now,
                now=now,
            )

    assert await record(["di_1"], {"status": (None, "active")})  # a row written before terms were
    assert not await record([terms], {})  # the same discount, its terms learned
    assert await record([terms, {**terms, "id": "di_2"}], {})  # another discount is a change
    assert await record([], {})  # and so is its removal
    entries = await ledger_of(database, "u7")
    assert [entry.changed for entry in entries] == [
        ["status", "quantity", "unit_amount", "currency", "discounts"],
        ["discounts"],
        ["discounts"],
    ]
