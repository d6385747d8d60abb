"""SIGKILL of `billing serve` between the commit of a change and the delivery of its host event:
the event is in the outbox, and the restarted service delivers it."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from billing.stripe_gateway import StripeGateway
from db.engine import Database
from db.migrate import upgrade
from db.models import host_event_table
from tests.billing_flows import checkout
from tests.conftest import free_port
from tests.gateways import sandbox_gateway
from tests.host_receiver import SECRET, run_host_receiver

BILLING = str(Path(sys.executable).with_name("billing"))


@asynccontextmanager
async def serve(env: dict[str, str], cwd: Path) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = cwd / f"serve-{port}.log"
    with log_path.open("w") as log:
        process = await asyncio.create_subprocess_exec(
            BILLING,
            "serve",
            "--port",
            str(port),
            env={**os.environ, **env, "PUBLIC_BASE_URL": base},
            cwd=cwd,
            stdout=log,
            stderr=log,
        )
        try:
            deadline = time.monotonic() + 30
            async with httpx.AsyncClient(timeout=1) as client:
                while True:
                    assert process.returncode is None, log_path.read_text()
                    try:
                        if (await client.get(f"{base}/readyz")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    assert time.monotonic() < deadline, "billing serve did not come up"
                    await asyncio.sleep(0.1)
            yield base, process
        finally:
            if process.returncode is None:
                process.terminate()
                await asyncio.wait_for(process.wait(), 15)


async def outbox(database: Database) -> int:
    async with database.read() as conn:
        return int((await conn.execute(select(func.count()).select_from(host_event_table))).scalar_one())


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgresql":
        return str(request.getfixturevalue("fresh_pg_url"))
    return f"sqlite+aiosqlite:///{tmp_path / 'billing.db'}"


async def test_an_event_committed_before_a_sigkill_is_delivered_after_the_restart(
    tmp_path: Path, database_url: str
) -> None:
    url = database_url
    await asyncio.to_thread(upgrade, url)
    database = Database.from_url(url)
    try:
        async with run_host_receiver(SECRET) as receiver:
            env = {"DATABASE_URL": url, "HOST_WEBHOOK_URL": receiver.url, "HOST_WEBHOOK_SECRET": SECRET}
            # The first process writes events but does not deliver them: killed "between the two".
            async with serve({**env, "HOST_EVENTS_WORKER": "false"}, tmp_path) as (base, process):
                gateway = sandbox_gateway(base)
                try:
                    price = await _price(gateway)
                    _customer, session_id = await checkout(gateway, {"starter_monthly": price}, "crash-user")
                    async with httpx.AsyncClient(timeout=30) as client:
                        done = await client.post(
                            f"{base}/sandbox/_control/checkout/{session_id}/complete",
                            json={"outcome": "paid"},
                        )
                    assert done.status_code == 200, done.text
                finally:
                    await gateway.close()
                deadline = time.monotonic() + 20
                while await outbox(database) < 2:  # checkout.completed, subscription.created
                    assert time.monotonic() < deadline, "no host events were written"
                    await asyncio.sleep(0.05)
                process.send_signal(signal.SIGKILL)
                await process.wait()
            assert receiver.deliveries == []
            written = await outbox(database)

            async with serve(env, tmp_path):
                await receiver.wait_for(lambda r: len(r.delivered) >= written, within=30)
            assert {"checkout.completed", "subscription.created"} <= set(receiver.types())
            assert all(d.event["data"]["userId"] == "crash-user" for d in receiver.delivered)
    finally:
        await database.dispose()


async def _price(gateway: StripeGateway) -> str:
    """The starter monthly price, once the service has synced its catalog into the sandbox."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        listed = await gateway.v1.prices.list_async({"lookup_keys": ["starter_monthly"]})
        if listed.data:
            return str(listed.data[0].id)
        await asyncio.sleep(0.1)
    raise AssertionError("the service never synced its catalog into the sandbox")
