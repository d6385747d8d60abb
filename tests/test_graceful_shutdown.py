"""SIGTERM to `billing serve` during a burst of webhook deliveries and usage recordings.

In-flight requests finish; the webhook worker and the usage reporter give back what they claimed
(instead of waiting for the lease to run out); after a restart every acknowledged event is applied
and every stored usage record is reported to Stripe exactly once (docs/deploy.md).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from billing.settings import Settings
from billing.stripe_gateway import StripeGateway
from db.engine import Database
from db.migrate import upgrade
from db.models import account_table, event_table, report_table, usage_table
from stripe_sandbox.store import Store, events
from tests.billing_flows import eventually, subscribe, wait_for_account
from tests.conftest import Service, free_port
from tests.gateways import sandbox_gateway
from tests.graphql_support import SERVICE_KEY
from tests.processes import BILLING, wait_ready

USERS = ["shut_a", "shut_b", "shut_c"]
RECORD = "mutation($input: RecordUsageInput!) { recordUsage(input: $input) { id } }"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'billing.db'}"
    return str(request.getfixturevalue("fresh_pg_url"))


@contextmanager
def serve_process(env: dict[str, str], cwd: Path, port: int, n: int) -> Iterator[subprocess.Popen[bytes]]:
    url = f"http://127.0.0.1:{port}"
    log = cwd / f"serve-{n}.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [BILLING, "serve", "--port", str(port)],
            env={**os.environ, **env, "PUBLIC_BASE_URL": url},
            cwd=cwd,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_ready(url, process, log)
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=30)


async def record(client: httpx.AsyncClient, url: str, user: str, key: str) -> bool:
    """One recordUsage; True when the service acknowledged it."""
    body = {
        "query": RECORD,
        "variables": {
            "input": {"userId": user, "feature": "api_calls", "quantity": 1, "idempotencyKey": key}
        },
    }
    try:
        response = await client.post(
            f"{url}/graphql", json=body, headers={"Authorization": f"Bearer {SERVICE_KEY}"}
        )
    except httpx.TransportError:
        return False
    return response.status_code == 200 and "errors" not in response.json()


async def touch_customer(gateway: StripeGateway, customer: str, n: int) -> bool:
    try:
        await gateway.v1.customers.update_async(customer, {"name": f"name {n}"})
    except Exception:
        return False
    return True


async def test_sigterm_during_a_burst_loses_nothing_and_applies_everything_once(
    database_url: str, tmp_path: Path
) -> None:
    await asyncio.to_thread(upgrade, database_url)
    env = {"DATABASE_URL": database_url, "SERVICE_API_KEY": SERVICE_KEY, "LOG_LEVEL": "INFO"}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    database = Database.from_url(database_url)
    gateway = sandbox_gateway(url, api_key="sk_test_shutdown", max_network_retries=0, timeout_seconds=10)
    service = Service(url=url, app=None, database=database, sandbox_db=None)  # type: ignore[arg-type]
    acknowledged: list[str] = []
    customers: dict[str, str] = {}
    try:
        with serve_process(env, tmp_path, port, 1) as first:

            async def catalog_synced() -> dict[str, str]:
                page = await gateway.v1.prices.list_async({"active": True, "limit": 100})
                found = {p.lookup_key: p.id for p in page.data if p.lookup_key}
                return found if "starter_api_calls_metered" in found else {}

            prices = await eventually(catalog_synced, what="the sandbox catalog synced at start-up")
            for user in USERS:
                customers[user], _ = await subscribe(
                    service, gateway, prices, user, metered=("starter_api_calls_metered",)
                )
                await wait_for_account(database, user, tier="starter")

            async with httpx.AsyncClient(timeout=30) as client:

                async def burst() -> None:
                    n = 0
                    while True:
                        user = USERS[n % len(USERS)]
                        key = f"burst-{n}"
                        results = await asyncio.gather(
                            record(client, url, user, key), touch_customer(gateway, customers[user], n)
                        )
                        if results[0]:
                            acknowledged.append(key)
                        if not any(results):
                            return
                        n += 1

                running = asyncio.create_task(burst())
                await eventually(
                    lambda: asyncio.sleep(0, len(acknowledged) >= 30), what="the burst under way"
                )
                first.send_signal(signal.SIGTERM)
                status = await asyncio.to_thread(first.wait, 60)
                await asyncio.wait_for(running, 30)
            log = (tmp_path / "serve-1.log").read_text()
            # uvicorn shuts down gracefully, then re-raises the signal: the exit status says SIGTERM.
            assert status in (0, -signal.SIGTERM), log[-3000:]
            assert "Application shutdown complete" in log, log[-3000:]

        with serve_process(env, tmp_path, port, 2):
            await eventually(
                lambda: settled(url, database), what="outbox, inbox and usage drained", seconds=60
            )
            sandbox_url, schema = Settings(database_url=database_url).sandbox_database()
            store = Store(sandbox_url, schema=schema)
            try:
                async with store.engine.connect() as conn:
                    outbox = (await conn.execute(select(events.c.id, events.c.delivered))).all()
                    meter_events = await meter_event_values(conn)
            finally:
                await store.dispose()
    finally:
        await gateway.close()

    async with database.read() as conn:
        inbox = {row.id: row for row in await conn.execute(select(event_table))}
        usage = (await conn.execute(select(usage_table))).all()
        reports = (await conn.execute(select(report_table))).all()
        accounts = {row.id: row for row in await conn.execute(select(account_table))}
    await database.dispose()

    # Webhooks: every event Stripe saw acknowledged is in the inbox once, and applied.
    assert len(acknowledged) >= 30
    delivered = [row.id for row in outbox if row.delivered]
    assert len(delivered) == len(outbox)
    assert set(delivered) <= set(inbox)
    assert {inbox[event_id].status for event_id in delivered} <= {"processed", "ignored"}
    assert {accounts_row.tier for accounts_row in accounts.values()} == {"starter"}
    # Usage: every acknowledged record stored once; every stored record reported once.
    keys = Counter(row.idempotency_key for row in usage)
    assert all(keys[key] == 1 for key in acknowledged)
    assert all(count == 1 for count in keys.values())
    assert all(row.reported_at is not None and row.report_id is not None for row in usage)
    assert {row.status for row in reports} == {"reported"}
    stored: Counter[str] = Counter()
    for row in usage:
        stored[accounts[row.account_id].stripe_customer_id] += int(row.quantity)
    assert meter_events == dict(stored)


async def settled(url: str, database: Database) -> bool:
    async with httpx.AsyncClient() as client:
        delivery = (await client.get(f"{url}/sandbox/_control/delivery")).json()
    async with database.read() as conn:
        busy = (
            await conn.execute(
                select(event_table.c.id).where(event_table.c.status.in_(["pending", "processing"])).limit(1)
            )
        ).first()
        unreported = (
            await conn.execute(select(usage_table.c.id).where(usage_table.c.reported_at.is_(None)).limit(1))
        ).first()
    return bool(delivery["pending"] == 0 and busy is None and unreported is None)


async def meter_event_values(conn: Any) -> dict[str, int]:
    """Per Stripe customer, the sum of the meter events Stripe accepted (no duplicates)."""
    import json

    from stripe_sandbox.store import objects

    rows = await conn.execute(select(objects.c.data).where(objects.c.object == "billing.meter_event"))
    totals: Counter[str] = Counter()
    identifiers: Counter[str] = Counter()
    for (data,) in rows:
        event = json.loads(data)
        identifiers[event["identifier"]] += 1
        totals[event["payload"]["stripe_customer_id"]] += int(event["payload"]["value"])
    assert all(count == 1 for count in identifiers.values())
    return dict(totals)
