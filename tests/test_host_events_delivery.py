"""Delivering host events: Standard Webhooks signatures verified by the library's own verifier,
retries on the schedule with one webhook-id, Retry-After, 410 Gone, failed for good, replay."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any

import pytest
from sqlalchemy import select
from standardwebhooks import Webhook
from standardwebhooks.exceptions import WebhookVerificationError

from billing.clock import utcnow
from billing.host_events import admin
from billing.host_events.delivery import DeliveryConfig, HostEventDelivery, retry_after, signed_headers
from billing.host_events.events import PendingHostEvent, insert_events
from db.engine import Database
from db.models import host_attempt_table, host_event_table
from tests.host_receiver import OTHER_SECRET, SECRET, HostReceiver, run_host_receiver


@pytest.fixture
async def receiver() -> AsyncIterator[HostReceiver]:
    async with run_host_receiver(SECRET) as running:
        yield running


def worker(database: Database, receiver: HostReceiver, delays: list[float], **more: Any) -> HostEventDelivery:
    config = DeliveryConfig(url=receiver.url, secrets=more.pop("secrets", [SECRET]), delays=delays)
    return HostEventDelivery(database=database, config=config, **more)


async def add(database: Database, *types: str, account_id: int | None = 1, user_id: str = "u1") -> None:
    async with database.write() as conn:
        await insert_events(
            conn,
            database,
            [PendingHostEvent(kind, {"userId": user_id, "n": index}) for index, kind in enumerate(types)],
            account_id=account_id,
            user_id=user_id,
            now=utcnow(),
        )


async def rows(database: Database) -> list[Any]:
    async with database.read() as conn:
        return list(await conn.execute(select(host_event_table).order_by(host_event_table.c.id)))


async def attempts(database: Database) -> list[Any]:
    async with database.read() as conn:
        return list(await conn.execute(select(host_attempt_table).order_by(host_attempt_table.c.id)))


async def deliver_until(delivery: HostEventDelivery, done: Any, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while not await done():
        assert time.monotonic() < deadline, "not done in time"
        await delivery.drain()
        await asyncio.sleep(0.01)


async def test_every_delivery_verifies_with_the_standard_webhooks_library(
    database: Database, receiver: HostReceiver
) -> None:
    await add(database, "subscription.created")
    delivery = worker(database, receiver, [1])
    try:
        report = await delivery.drain()
    finally:
        await delivery.close()
    assert report.delivered == 1
    [got] = receiver.delivered
    assert got.event["type"] == "subscription.created"
    assert got.event["data"] == {"userId": "u1", "n": 0}
    assert datetime.fromisoformat(got.event["timestamp"]).tzinfo is not None
    [row] = await rows(database)
    assert (row.status, row.attempts, row.last_status_code) == ("delivered", 1, 200)
    assert got.message_id == row.message_id and got.message_id.startswith("msg_")
    assert abs(int(got.headers["webhook-timestamp"]) - time.time()) < 60

    # The verifier refuses a tampered body, a wrong secret and a stale timestamp.
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(got.body.replace(b"u1", b"u2"), got.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(OTHER_SECRET).verify(got.body, got.headers)
    stale = datetime.now(UTC) - timedelta(minutes=10)
    old = signed_headers([SECRET], got.message_id, got.body, timestamp=stale)
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(SECRET).verify(got.body, old)
    Webhook(SECRET).verify(got.body, got.headers)  # the genuine one still passes


async def test_during_a_rotation_each_message_is_signed_with_every_secret(
    database: Database, receiver: HostReceiver
) -> None:
    await add(database, "invoice.paid")
    delivery = worker(database, receiver, [1], secrets=[OTHER_SECRET, SECRET])
    try:
        await delivery.drain()
    finally:
        await delivery.close()
    [got] = receiver.delivered
    assert len(got.headers["webhook-signature"].split(" ")) == 2
    Webhook(OTHER_SECRET).verify(got.body, got.headers)
    Webhook(SECRET).verify(got.body, got.headers)


async def test_500_three_times_then_200_is_four_attempts_with_one_webhook_id_and_backoff(
    database: Database, receiver: HostReceiver
) -> None:
    answers = iter([500, 500, 500, 200])
    receiver.respond = lambda _delivery: next(answers)
    await add(database, "payment.failed")
    delivery = worker(database, receiver, [0.2, 0.4, 0.6, 10])

    async def delivered() -> bool:
        return (await rows(database))[0].status == "delivered"

    try:
        await deliver_until(delivery, delivered)
    finally:
        await delivery.close()
    assert [d.status for d in receiver.deliveries] == [500, 500, 500, 200]
    assert len({d.message_id for d in receiver.deliveries}) == 1
    assert len({d.headers["webhook-signature"] for d in receiver.deliveries}) >= 2  # signed afresh
    gaps = [b.received_at - a.received_at for a, b in pairwise(receiver.deliveries)]
    assert all(gap >= want for gap, want in zip(gaps, [0.2, 0.4, 0.6], strict=True)), gaps
    tried = await attempts(database)
    assert [(a.attempt, a.status_code) for a in tried] == [(1, 500), (2, 500), (3, 500), (4, 200)]
    assert all(a.latency_ms >= 0 and a.url == receiver.url for a in tried)
    [row] = await rows(database)
    assert (row.attempts, row.last_error) == (4, None)


async def test_retry_after_is_honoured(database: Database, receiver: HostReceiver) -> None:
    answers = iter([(503, {"Retry-After": "1"}), 200])
    receiver.respond = lambda _delivery: next(answers)
    await add(database, "invoice.paid")
    delivery = worker(database, receiver, [0.05])

    async def delivered() -> bool:
        return (await rows(database))[0].status == "delivered"

    try:
        await deliver_until(delivery, delivered)
    finally:
        await delivery.close()
    first, second = receiver.deliveries
    assert second.received_at - first.received_at >= 0.95


def test_retry_after_reads_seconds_and_http_dates() -> None:
    now = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
    assert retry_after("120", now=now) == timedelta(seconds=120)
    assert retry_after("Mon, 07 Dec 2026 12:01:00 GMT", now=now) == timedelta(seconds=60)
    assert retry_after("Mon, 07 Dec 2026 11:00:00 GMT", now=now) == timedelta(0)
    assert retry_after("9999999", now=now) == timedelta(days=1)
    assert retry_after("soon", now=now) is None
    assert retry_after(None, now=now) is None


async def test_down_past_the_retry_window_fails_for_good_then_replay_delivers(
    database: Database, receiver: HostReceiver
) -> None:
    receiver.respond = 500
    await add(database, "subscription.canceled")
    delivery = worker(database, receiver, [0.05, 0.05])

    async def failed() -> bool:
        return (await rows(database))[0].status == "failed"

    try:
        await deliver_until(delivery, failed)
        assert len(receiver.deliveries) == 3  # the first try and one per delay
        [listed] = await admin.list_events(database, failed=True)
        assert (listed.type, listed.attempts, listed.last_status_code) == ("subscription.canceled", 3, 500)
        assert "HTTP 500" in (listed.last_error or "")

        would = await admin.replay(database, failed=True, now=utcnow(), dry_run=True)
        assert [row.id for row in would] == [listed.id]
        assert (await rows(database))[0].status == "failed"  # a dry run changes nothing

        receiver.respond = 200
        replayed = await admin.replay(database, failed=True, url=receiver.url, now=utcnow())
        assert [row.id for row in replayed] == [listed.id]
        report = await delivery.drain()
    finally:
        await delivery.close()
    assert report.delivered == 1
    assert await admin.list_events(database, failed=True) == []
    assert len({d.message_id for d in receiver.deliveries}) == 1  # the same webhook-id again
    assert (await admin.counts(database))["delivered"] == 1


async def test_410_gone_disables_the_endpoint_until_a_replay(
    database: Database, receiver: HostReceiver
) -> None:
    receiver.respond = 410
    await add(database, "subscription.updated", "subscription.updated", account_id=7)
    delivery = worker(database, receiver, [0.01, 0.01])
    try:
        report = await delivery.drain()
        assert report.disabled
        assert len(receiver.deliveries) == 1
        state = await admin.endpoint_state(database, receiver.url)
        assert state.disabled_at is not None and "410" in (state.disabled_reason or "")
        await asyncio.sleep(0.05)
        again = await delivery.drain()
        assert again.disabled and len(receiver.deliveries) == 1  # nothing sent while disabled
        assert [row.status for row in await rows(database)] == ["pending", "pending"]

        receiver.respond = 200
        first = (await rows(database))[0]
        await admin.replay(database, event=first.message_id, url=receiver.url, now=utcnow())
        assert (await admin.endpoint_state(database, receiver.url)).disabled_at is None
        await delivery.drain()
    finally:
        await delivery.close()
    assert [row.status for row in await rows(database)] == ["delivered", "delivered"]


async def test_an_accounts_later_event_waits_while_an_earlier_one_is_retried(
    database: Database, receiver: HostReceiver
) -> None:
    def answer(delivery: Any) -> int:
        if delivery.event["data"]["n"] == 0 and delivery.event["data"]["userId"] == "a":
            return 500 if sum(1 for d in receiver.deliveries if d.event["data"]["userId"] == "a") < 2 else 200
        return 200

    receiver.respond = answer
    await add(database, "subscription.created", "subscription.updated", account_id=1, user_id="a")
    await add(database, "subscription.created", account_id=2, user_id="b")
    delivery = worker(database, receiver, [0.2, 0.2, 0.2])

    async def all_delivered() -> bool:
        return all(row.status == "delivered" for row in await rows(database))

    try:
        first = await delivery.drain()
        # Account a's first event failed; its second waits; account b is not held up.
        assert first.delivered == 1 and first.retrying == 1
        assert [d.event["data"]["userId"] for d in receiver.delivered] == ["b"]
        await deliver_until(delivery, all_delivered)
    finally:
        await delivery.close()
    of_a = [(d.event["type"], d.status) for d in receiver.deliveries if d.event["data"]["userId"] == "a"]
    assert of_a == [
        ("subscription.created", 500),
        ("subscription.created", 500),
        ("subscription.created", 200),
        ("subscription.updated", 200),
    ]


async def test_an_event_claimed_by_a_worker_that_died_is_delivered_when_its_lease_runs_out(
    database: Database, receiver: HostReceiver
) -> None:
    await add(database, "checkout.completed")
    dead = worker(database, receiver, [1], lease=timedelta(seconds=0.5))
    survivor = worker(database, receiver, [1], lease=timedelta(seconds=0.5))
    try:
        assert len(await dead.claim()) == 1  # ... and the process dies before the POST
        assert (await survivor.drain()).total == 0  # leased: not due yet
        await asyncio.sleep(0.6)
        assert (await survivor.drain()).delivered == 1
    finally:
        await dead.close()
        await survivor.close()
    [row] = await rows(database)
    assert (row.status, row.attempts) == ("delivered", 2)
    assert len(receiver.delivered) == 1


@pytest.mark.postgres_only
async def test_several_workers_deliver_each_event_once_in_order_per_account(
    database: Database, receiver: HostReceiver
) -> None:
    for account in range(8):
        await add(database, *(["subscription.updated"] * 6), account_id=account, user_id=f"user-{account}")
    workers = [worker(database, receiver, [0.05], batch_size=3) for _ in range(3)]

    async def done() -> bool:
        return all(row.status == "delivered" for row in await rows(database))

    async def run(delivery: HostEventDelivery) -> None:
        deadline = time.monotonic() + 20
        while not await done():
            assert time.monotonic() < deadline
            await delivery.drain()
            await asyncio.sleep(0.005)

    try:
        await asyncio.gather(*(run(delivery) for delivery in workers))
    finally:
        for delivery in workers:
            await delivery.close()
    ids = [d.message_id for d in receiver.deliveries]
    assert len(ids) == len(set(ids)) == 48
    for account in range(8):
        sequence = [
            d.event["data"]["n"]
            for d in receiver.deliveries
            if d.event["data"]["userId"] == f"user-{account}"
        ]
        assert sequence == list(range(6))
