"""Stripe delivers at least once: every copy gets a 2xx, exactly one effect happens."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from billing.stripe_gateway import StripeGateway
from billing.webhooks import Envelope, store_event
from db.engine import Database
from db.models import account_table, event_table
from tests.conftest import DbTarget, Service, free_port, running_service
from tests.gateways import sandbox_gateway
from tests.processes import BILLING, billing_serve
from tests.stripe_events import event, post_event


@pytest.fixture
async def service(database: Database, sandbox_db: DbTarget) -> AsyncIterator[Service]:
    """The service with the sandbox's own deliveries off: the test posts every event itself."""
    async with running_service(database, sandbox_db, sandbox={"deliver_webhooks": False}) as running:
        yield running


async def new_customer(gateway: StripeGateway, user_id: str) -> dict[str, object]:
    customer = await gateway.v1.customers.create_async(
        {"email": f"{user_id}@example.com", "metadata": {"userId": user_id}}
    )
    return customer.to_dict()


async def wait_processed(database: Database, event_id: str) -> tuple[str, int]:
    deadline = time.monotonic() + 15
    while True:
        async with database.read() as conn:
            row = (
                await conn.execute(
                    select(event_table.c.status, event_table.c.attempts).where(event_table.c.id == event_id)
                )
            ).first()
        if row is not None and row.status in ("processed", "ignored", "failed"):
            return row.status, row.attempts
        if time.monotonic() > deadline:
            raise AssertionError(f"event {event_id} not processed: {row}")
        await asyncio.sleep(0.05)


async def counts(database: Database) -> tuple[int, int]:
    async with database.read() as conn:
        events = (await conn.execute(select(func.count()).select_from(event_table))).scalar_one()
        accounts = (await conn.execute(select(func.count()).select_from(account_table))).scalar_one()
    return int(events), int(accounts)


async def test_a_duplicate_delivered_later_is_acknowledged_and_ignored(
    service: Service, stripe_gateway: StripeGateway
) -> None:
    customer = await new_customer(stripe_gateway, "u1")
    evt = event("customer.updated", customer)
    async with httpx.AsyncClient() as client:
        first = await post_event(client, service.url, evt)
        assert await wait_processed(service.database, evt["id"]) == ("processed", 1)
        second = await post_event(client, service.url, evt)
    assert first.json() == {"received": True, "duplicate": False}
    assert second.status_code == 200 and second.json()["duplicate"] is True
    assert await counts(service.database) == (1, 1)
    assert await wait_processed(service.database, evt["id"]) == ("processed", 1)


async def test_ten_parallel_copies_cause_one_effect(service: Service, stripe_gateway: StripeGateway) -> None:
    customer = await new_customer(stripe_gateway, "u1")
    evt = event("customer.updated", customer)
    async with httpx.AsyncClient() as client:
        responses = await asyncio.gather(*(post_event(client, service.url, evt) for _ in range(10)))
    assert [r.status_code for r in responses] == [200] * 10
    assert sum(not r.json()["duplicate"] for r in responses) == 1
    assert await wait_processed(service.database, evt["id"]) == ("processed", 1)
    assert await counts(service.database) == (1, 1)


async def test_a_conflict_on_the_event_id_is_a_duplicate_but_other_integrity_errors_are_not(
    database: Database,
) -> None:
    from datetime import UTC, datetime

    now = datetime.now(UTC)
    envelope = Envelope("evt_same", "customer.updated", now, {"id": "evt_same"})
    assert await store_event(database, envelope, now=now) is True
    assert await store_event(database, envelope, now=now) is False
    broken = Envelope("evt_other", "customer.updated", None, {"id": "evt_other"})  # type: ignore[arg-type]
    with pytest.raises(Exception, match=r"(?i)null"):
        await store_event(database, broken, now=now)


async def test_the_inbox_keeps_the_event_as_received(database: Database) -> None:
    """Stored from the body's own text: what a reader gets back is the event Stripe sent,
    including text that merely looks like a NUL escape and characters beyond ASCII."""
    from datetime import UTC, datetime

    from billing.webhooks import parse_event

    body = (
        '{"id": "evt_text", "type": "customer.updated", "created": 1700000000, '
        '"data": {"object": {"id": "cus_1", "name": "Zoë ☃ \\u00e9 \\\\u0000", "metadata": {}}}}'
    ).encode()
    envelope = parse_event(body)
    assert envelope.payload["data"]["object"]["name"] == "Zoë ☃ é \\u0000"
    now = datetime.now(UTC)
    assert await store_event(database, envelope, now=now) is True
    async with database.read() as conn:
        stored = (
            await conn.execute(select(event_table.c.payload).where(event_table.c.id == "evt_text"))
        ).scalar_one()
    assert stored == envelope.payload

    without_raw = Envelope("evt_dict", "customer.updated", now, {"id": "evt_dict", "n": [1, 2]})
    assert await store_event(database, without_raw, now=now) is True
    async with database.read() as conn:
        stored = (
            await conn.execute(select(event_table.c.payload).where(event_table.c.id == "evt_dict"))
        ).scalar_one()
    assert stored == {"id": "evt_dict", "n": [1, 2]}


# Two service processes sharing one PostgreSQL -------------------------------------------------


@pytest.fixture
def two_processes(fresh_pg_url: str, tmp_path: Path) -> Iterator[list[str]]:
    env = {"DATABASE_URL": fresh_pg_url, "SANDBOX_SYNC_CATALOG": "false"}
    subprocess.run(
        [BILLING, "migrate"], env={**os.environ, **env}, check=True, capture_output=True, cwd=tmp_path
    )
    with billing_serve(env, tmp_path, count=2) as urls:
        yield urls


@pytest.mark.postgres_only
async def test_copies_sent_to_two_processes_cause_one_effect(
    two_processes: list[str], fresh_pg_url: str
) -> None:
    gateway = sandbox_gateway(two_processes[0])
    database = Database.from_url(fresh_pg_url)
    try:
        customer = await new_customer(gateway, "u-two")
        evt = event("customer.updated", customer)
        async with httpx.AsyncClient() as client:
            responses = await asyncio.gather(
                *(post_event(client, two_processes[i % 2], evt) for i in range(10))
            )
        assert [r.status_code for r in responses] == [200] * 10
        assert await wait_processed(database, evt["id"]) == ("processed", 1)  # claimed and applied once
        async with database.read() as conn:
            updated = (
                await conn.execute(
                    select(func.count())
                    .select_from(event_table)
                    .where(event_table.c.type == "customer.updated")
                )
            ).scalar_one()
            accounts = (await conn.execute(select(func.count()).select_from(account_table))).scalar_one()
        assert (updated, accounts) == (1, 1)  # (the sandbox also delivers its own customer.created)
    finally:
        await gateway.close()
        await database.dispose()


async def test_a_database_outage_answers_503_so_stripe_retries_and_nothing_is_lost(
    service: Service, sandbox_db: DbTarget
) -> None:
    from dataclasses import replace

    from graph.app import create_app, sandbox_config
    from tests.conftest import serve, service_settings

    evt = event("customer.updated", {"id": "cus_outage", "object": "customer", "metadata": {}})
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    settings = service_settings(url)
    down = Database.from_url("postgresql+asyncpg://postgres@127.0.0.1:1/unreachable")
    config = replace(
        sandbox_config(settings),
        database_url=sandbox_db.url,
        schema=sandbox_db.schema,
        deliver_webhooks=False,
    )
    outage = create_app(settings, database=down, sandbox=config)
    try:
        async with serve(outage, port), httpx.AsyncClient() as client:
            refused = await post_event(client, url, evt)
    finally:
        await down.dispose()
    assert refused.status_code == 503

    async with httpx.AsyncClient() as client:  # Stripe's retry reaches a healthy process
        accepted = await post_event(client, service.url, evt)
    assert accepted.status_code == 200 and accepted.json()["duplicate"] is False
    async with service.database.read() as conn:
        assert (await conn.execute(select(event_table.c.id))).scalars().all() == [evt["id"]]
