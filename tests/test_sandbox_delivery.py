"""The sandbox delivers its outbox as Stripe delivers webhooks: signed, retried, at least once."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import stripe
from sqlalchemy import select

from db.engine import Database
from stripe_sandbox.api import SandboxConfig
from stripe_sandbox.delivery import Deliverer
from stripe_sandbox.store import Store, delivery_attempts
from tests.conftest import DbTarget, free_port
from tests.hooked import SECRET, THIRTY_DAYS, Hooked, created_for, customer_of, hooked_service
from tests.webhook_receiver import Delivery, WebhookReceiver, run_receiver


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    async with run_receiver() as running:
        yield running


@pytest.fixture
async def hooked(
    database: Database, sandbox_db: DbTarget, receiver: WebhookReceiver
) -> AsyncIterator[Hooked]:
    async with hooked_service(database, sandbox_db, receiver) as running:
        yield running


class Gate:
    """Holds the first delivery at the receiver until released, so a backlog builds up."""

    def __init__(self) -> None:
        self.held = asyncio.Event()
        self.released = asyncio.Event()

    async def __call__(self, delivery: Delivery) -> int:
        self.held.set()
        await asyncio.wait_for(self.released.wait(), 10)
        return 200


# Signing -------------------------------------------------------------------------------------


async def test_a_created_customer_is_delivered_once_signed_with_the_configured_secret(
    hooked: Hooked,
) -> None:
    customer = await hooked.gateway.v1.customers.create_async({"email": "a@example.com"})
    await hooked.receiver.wait_for(lambda r: len(created_for(r, customer.id)) >= 1)
    drained = await hooked.control("POST", "/_control/delivery/flush", {"timeout": 10})
    await hooked.receiver.settle(quiet=0.5)

    [delivery] = created_for(hooked.receiver, customer.id)
    assert hooked.receiver.event_ids == [delivery.event_id]  # once, and nothing else
    assert delivery.headers["content-type"] == "application/json; charset=utf-8"
    assert delivery.headers["user-agent"] == "Stripe/1.0 (+https://stripe.com/docs/webhooks)"
    event = stripe.Webhook.construct_event(delivery.body, delivery.signature, SECRET)
    assert event.type == "customer.created"
    assert event.data.object.id == customer.id
    assert event.data.object.email == "a@example.com"
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(delivery.body, delivery.signature, "whsec_someone_else_entirely")
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(
            delivery.body.replace(b"a@example", b"b@example"), delivery.signature, SECRET
        )

    assert drained["pending"] == 0
    status = await hooked.control("GET", "/_control/delivery")
    assert status == {
        "mode": "ordered",
        "enabled": True,
        "endpoint_url": hooked.receiver.url,
        "pending": 0,
        "delivered": 1,
        "failed": 0,
        "failed_attempts": 0,
    }
    [row] = await hooked.outbox()
    assert (row["id"], row["delivered"], row["attempts"], row["last_error"]) == (event.id, True, 1, None)


async def test_the_signature_carries_real_time_when_the_sandbox_clock_is_ahead(hooked: Hooked) -> None:
    async with hooked.sandbox.store.transaction() as tx:
        await tx.set_state("clock_offset", str(THIRTY_DAYS))
    before = int(time.time())
    customer = await hooked.gateway.v1.customers.create_async({"name": "future"})
    await hooked.receiver.wait_for(lambda r: len(created_for(r, customer.id)) >= 1)
    after = int(time.time())

    [delivery] = created_for(hooked.receiver, customer.id)
    assert before + THIRTY_DAYS <= delivery.event["created"] <= after + THIRTY_DAYS  # sandbox time
    assert before <= delivery.signed_at <= after  # wall clock
    event = stripe.Webhook.construct_event(delivery.body, delivery.signature, SECRET)  # 300 s tolerance
    assert event.data.object.id == customer.id


# Retries -------------------------------------------------------------------------------------


def test_the_retry_schedule_doubles_from_the_base_delay_up_to_the_cap() -> None:
    url = "sqlite+aiosqlite://"
    deliverer = Deliverer(Store(url), SandboxConfig(database_url=url))  # the defaults
    assert [deliverer.retry_delay(n) for n in range(1, 10)] == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert deliverer.retry_delay(20) == 3600


async def test_an_endpoint_failing_twice_gets_the_event_three_times_and_it_ends_delivered(
    hooked: Hooked,
) -> None:
    answers = iter([500, 500])

    async def flaky(delivery: Delivery) -> int:
        return next(answers, 200)

    hooked.receiver.respond = flaky
    customer = await hooked.gateway.v1.customers.create_async({"name": "retry me"})
    await hooked.receiver.wait_for(lambda r: len(created_for(r, customer.id)) >= 3, within=15)
    stats = await hooked.sandbox.delivery.drain(timeout=10)
    await hooked.receiver.settle(quiet=0.5)

    received = created_for(hooked.receiver, customer.id)
    assert [d.status for d in received] == [500, 500, 200]
    assert len({d.event_id for d in received}) == 1
    assert received[0].received_at < received[1].received_at < received[2].received_at
    assert all(stripe.Webhook.construct_event(d.body, d.signature, SECRET) for d in received)
    assert (stats.pending, stats.delivered, stats.failed, stats.failed_attempts) == (0, 1, 0, 2)
    [row] = await hooked.outbox()
    assert row["delivered"] is True
    assert row["attempts"] == 3
    assert row["last_error"].startswith("HTTP 500")


async def test_resend_sends_a_delivered_event_again_and_every_answer_is_kept(hooked: Hooked) -> None:
    answers = iter([500])

    async def answer(delivery: Delivery) -> int:
        return next(answers, 200)

    hooked.receiver.respond = answer
    customer = await hooked.gateway.v1.customers.create_async({"name": "resend me"})
    await hooked.receiver.wait_for(lambda r: len(created_for(r, customer.id)) >= 2, within=15)
    await hooked.sandbox.delivery.drain(timeout=10)
    [row] = await hooked.outbox()
    assert row["delivered"] is True

    resent = await hooked.control("POST", f"/_control/events/{row['id']}/resend")
    await hooked.receiver.wait_for(lambda r: len(created_for(r, customer.id)) >= 3)
    assert resent["event"] == row["id"]
    assert [(a["url"], a["status"]) for a in resent["attempts"]] == [(hooked.receiver.url, 200)]
    received = created_for(hooked.receiver, customer.id)
    assert {d.event_id for d in received} == {row["id"]}
    assert stripe.Webhook.construct_event(received[-1].body, received[-1].signature, SECRET)
    [after] = await hooked.outbox()
    assert (after["delivered"], after["attempts"]) == (True, 3)
    async with hooked.sandbox.store.transaction() as tx:
        kept = (
            await tx.conn.execute(
                select(delivery_attempts.c.status, delivery_attempts.c.resend)
                .where(delivery_attempts.c.event_id == row["id"])
                .order_by(delivery_attempts.c.seq)
            )
        ).all()
    assert [tuple(k) for k in kept] == [(500, False), (200, False), (200, True)]

    async with httpx.AsyncClient(timeout=10) as client:
        unknown = await client.post(f"{hooked.url}/sandbox/_control/events/evt_nope/resend")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "resource_missing"


async def test_an_unreachable_endpoint_is_retried_then_given_up_with_the_error_kept(
    database: Database, sandbox_db: DbTarget
) -> None:
    nobody = WebhookReceiver(url=f"http://127.0.0.1:{free_port()}/webhooks/stripe")  # nothing listens
    async with hooked_service(database, sandbox_db, nobody) as hooked:
        hooked.sandbox.delivery.max_attempts = 3
        await hooked.gateway.v1.customers.create_async({"name": "lost"})
        deadline = time.monotonic() + 15
        while (stats := await hooked.sandbox.delivery.stats()).failed == 0:
            assert time.monotonic() < deadline, stats
            await asyncio.sleep(0.05)
        [row] = await hooked.outbox()
    assert (stats.pending, stats.delivered, stats.failed, stats.failed_attempts) == (0, 0, 1, 3)
    assert (row["delivered"], row["attempts"], row["next_attempt_at"]) == (False, 3, None)
    assert "ConnectError" in row["last_error"]


# Modes ---------------------------------------------------------------------------------------


async def test_ordered_mode_delivers_a_backlog_in_creation_order(hooked: Hooked) -> None:
    status = await hooked.control("POST", "/_control/delivery", {"mode": "ordered"})
    assert status["mode"] == "ordered"
    gate = Gate()
    hooked.receiver.respond = gate
    first = await hooked.gateway.v1.customers.create_async({"name": "c0"})
    await asyncio.wait_for(gate.held.wait(), 10)
    rest = [(await hooked.gateway.v1.customers.create_async({"name": f"c{i}"})).id for i in range(1, 10)]
    gate.released.set()
    await hooked.sandbox.delivery.drain(timeout=10)
    await hooked.receiver.settle(quiet=0.3)

    assert [customer_of(d) for d in hooked.receiver.deliveries] == [first.id, *rest]
    emitted = [row["id"] for row in await hooked.outbox()]
    assert hooked.receiver.event_ids == emitted


async def test_shuffled_duplicated_mode_delivers_every_event_at_least_once_with_duplicates(
    hooked: Hooked,
) -> None:
    status = await hooked.control("POST", "/_control/delivery", {"mode": "shuffled_duplicated"})
    assert status["mode"] == "shuffled_duplicated"
    gate = Gate()
    hooked.receiver.respond = gate
    first = await hooked.gateway.v1.customers.create_async({"name": "c0"})
    await asyncio.wait_for(gate.held.wait(), 10)
    backlog = [(await hooked.gateway.v1.customers.create_async({"name": f"c{i}"})).id for i in range(1, 20)]
    gate.released.set()
    stats = await hooked.sandbox.delivery.drain(timeout=15)
    await hooked.receiver.settle(quiet=0.3)

    emitted = [row["id"] for row in await hooked.outbox()]
    counts = Counter(hooked.receiver.event_ids)
    assert len(emitted) == 20
    assert set(counts) == set(emitted)
    assert max(counts.values()) > 1  # P(no duplicate among 20) = 3**-20
    assert max(counts.values()) <= 3
    arrival = list(
        dict.fromkeys(customer_of(d) for d in hooked.receiver.deliveries if customer_of(d) != first.id)
    )
    assert sorted(arrival) == sorted(backlog)
    assert arrival != backlog  # the backlog went out as one shuffled batch (P(same order) = 1/19!)
    assert all(
        stripe.Webhook.construct_event(d.body, d.signature, SECRET) for d in hooked.receiver.deliveries
    )
    assert (stats.pending, stats.delivered, stats.failed_attempts) == (0, 20, 0)


async def test_an_unknown_mode_is_refused(hooked: Hooked) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.post(f"{hooked.url}/sandbox/_control/delivery", json={"mode": "chaos"})
    assert response.status_code == 400
    assert (await hooked.control("GET", "/_control/delivery"))["mode"] == "ordered"


# Switched off, and no lock held --------------------------------------------------------------


async def test_with_delivery_switched_off_nothing_is_sent(
    database: Database, sandbox_db: DbTarget, receiver: WebhookReceiver
) -> None:
    async with hooked_service(database, sandbox_db, receiver, deliver_webhooks=False) as hooked:
        await hooked.gateway.v1.customers.create_async({"name": "quiet"})
        await asyncio.sleep(0.5)  # ten polls of the loop
        stats = await hooked.sandbox.delivery.drain(timeout=1)
        [row] = await hooked.outbox()
    assert receiver.deliveries == []
    assert (stats.enabled, stats.pending, stats.delivered) == (False, 1, 0)
    assert (row["type"], row["delivered"], row["attempts"]) == ("customer.created", False, 0)


async def test_delivery_holds_no_write_transaction_while_the_endpoint_calls_back(hooked: Hooked) -> None:
    """The receiver creates a customer in the sandbox while its delivery is in flight: on SQLite a
    write transaction held across the POST would block that call until the SDK times out (5 s)."""
    made: list[str] = []

    async def call_back(delivery: Delivery) -> int:
        customer = delivery.event["data"]["object"]
        if delivery.event["type"] == "customer.created" and customer["metadata"].get("kind") == "first":
            started = time.monotonic()
            second = await hooked.gateway.v1.customers.create_async({"metadata": {"kind": "second"}})
            assert time.monotonic() - started < 2
            made.append(second.id)
        return 200

    hooked.receiver.respond = call_back
    first = await hooked.gateway.v1.customers.create_async({"metadata": {"kind": "first"}})
    await hooked.receiver.wait_for(lambda r: bool(made) and len(created_for(r, made[0])) == 1)
    stats = await hooked.sandbox.delivery.drain(timeout=10)

    assert hooked.receiver.errors == []
    assert [customer_of(d) for d in hooked.receiver.deliveries] == [first.id, made[0]]
    assert [d.status for d in hooked.receiver.deliveries] == [200, 200]
    assert (stats.pending, stats.delivered) == (0, 2)


async def test_a_stop_during_the_claim_gives_the_batch_back_at_once(
    database: Database, sandbox_db: DbTarget, receiver: WebhookReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process stops (its task cancelled) just as a claim commits: the batch is due again now,
    not when its lease ends minutes later (a restarted service would wait that long)."""
    async with hooked_service(database, sandbox_db, receiver, deliver_webhooks=False) as hooked:
        for n in range(3):
            await hooked.gateway.v1.customers.create_async({"name": f"stopped{n}"})
        deliverer = hooked.sandbox.delivery
        claim = deliverer._claim
        committed = asyncio.Event()

        async def claim_then_stop() -> Any:
            result = await claim()
            committed.set()
            await asyncio.sleep(0.5)  # the cancellation lands here, the lease already written
            return result

        monkeypatch.setattr(deliverer, "_claim", claim_then_stop)
        passing = asyncio.create_task(deliverer.deliver_due())
        await asyncio.wait_for(committed.wait(), 10)
        passing.cancel()
        await asyncio.gather(passing, return_exceptions=True)
        rows = await hooked.outbox()
    assert passing.cancelled() and receiver.deliveries == []
    assert len(rows) == 3
    assert all(not row["delivered"] and row["next_attempt_at"] <= time.time() for row in rows), rows
