"""Real-time updates across processes: `billing serve` processes on one PostgreSQL database, a
killed LISTEN connection, and `billing sync` / `billing events replay` (the CLI) on SQLite."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy import text

from billing.stripe_gateway import StripeGateway
from db.engine import Database
from tests.billing_flows import checkout, settle, setup_catalog, subscribe, wait_for_account
from tests.conftest import PG_HOST, PG_PORT, PG_USER, Service, free_port
from tests.gateways import sandbox_gateway
from tests.graphql_support import hs256_token
from tests.realtime_support import DELIVERY, WAIT, live_socket, terminate_backend, watch_commit

BILLING = str(Path(sys.executable).with_name("billing"))
QUIET = 0.5


def run(*args: str, env: Mapping[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BILLING, *args], env={**os.environ, **env}, cwd=cwd, capture_output=True, text=True, timeout=120
    )


@asynccontextmanager
async def billing_serve(port: int, env: Mapping[str, str], cwd: Path) -> AsyncIterator[str]:
    """`billing serve` in its own process, up and answering; terminated afterwards."""
    log_path = cwd / f"serve-{port}.log"
    log = log_path.open("w")
    process = await asyncio.create_subprocess_exec(
        BILLING, "serve", "--port", str(port), env={**os.environ, **env}, cwd=cwd, stdout=log, stderr=log
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        async with httpx.AsyncClient(timeout=1) as client:
            while True:
                if process.returncode is not None:
                    raise AssertionError(f"billing serve exited: {log_path.read_text()}")
                try:
                    if (await client.get(f"{base}/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError("billing serve did not come up")
                await asyncio.sleep(0.1)
        yield base
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                process.kill()
                await process.wait()
        log.close()


async def sandbox_prices(gateway: StripeGateway) -> dict[str, str]:
    """The starter monthly price, once the service has synced its catalog into the sandbox."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        listed = await gateway.v1.prices.list_async({"lookup_keys": ["starter_monthly"]})
        if listed.data:
            return {"starter_monthly": listed.data[0].id}
        await asyncio.sleep(0.1)
    raise AssertionError("the service never synced its catalog into the sandbox")


async def pay_checkout(base: str, gateway: StripeGateway, prices: dict[str, str], user_id: str) -> None:
    _customer, session_id = await checkout(gateway, prices, user_id)
    async with httpx.AsyncClient(timeout=30) as client:
        done = await client.post(
            f"{base}/sandbox/_control/checkout/{session_id}/complete", json={"outcome": "paid"}
        )
    assert done.status_code == 200, done.text


async def execute(database: Database, sql: str) -> list[Any]:
    async with database.write() as conn:
        result = await conn.execute(text(sql))
        return list(result.all()) if result.returns_rows else []


# PostgreSQL -----------------------------------------------------------------------------------


@pytest.mark.postgres_only
async def test_two_serve_processes_a_change_applied_by_b_reaches_a_subscriber_of_a(
    fresh_pg_url: str, tmp_path: Path
) -> None:
    env = {"DATABASE_URL": fresh_pg_url}
    migrated = await asyncio.to_thread(run, "migrate", env=env, cwd=tmp_path)
    assert migrated.returncode == 0, migrated.stderr
    port_a, port_b = free_port(), free_port()
    b_url = f"http://127.0.0.1:{port_b}"
    # Every webhook goes to B (both sandboxes deliver there) and only B applies them: A only
    # serves the subscriber, so what it sends can only come from B's write, over NOTIFY.
    env_b = {**env, "PUBLIC_BASE_URL": b_url}
    env_a = {**env_b, "WEBHOOK_WORKER": "false", "USAGE_REPORTER": "false", "SANDBOX_SYNC_CATALOG": "false"}
    database = Database.from_url(fresh_pg_url)
    gateway = sandbox_gateway(b_url)
    try:
        async with (
            billing_serve(port_b, env_b, tmp_path) as b,
            billing_serve(port_a, env_a, tmp_path) as a,
            live_socket(a, hs256_token("rt-two")) as ada_on_a,
            live_socket(b, hs256_token("rt-other")) as other_on_b,
        ):
            await ada_on_a.subscribe()
            await other_on_b.subscribe()
            assert (await ada_on_a.next_state())[1]["status"] == "NONE"
            assert (await other_on_b.next_state())[1]["status"] == "NONE"
            prices = await sandbox_prices(gateway)

            committed = watch_commit(database, "rt-two", status="trialing")
            await pay_checkout(b, gateway, prices, "rt-two")
            at, state = await ada_on_a.state_where(lambda s: s["status"] == "TRIALING")
            assert at - await committed < DELIVERY
            assert state["tier"] == "STARTER" and state["hasAccess"] is True

            await settle(b, database)
            await asyncio.sleep(QUIET)
            assert other_on_b.unread() == []
            assert await execute(
                database, "SELECT count(*) FROM stripe_event WHERE status = 'processed'"
            ) != [(0,)]
    finally:
        await gateway.close()
        await database.dispose()


async def listener_backend(pid: int) -> str | None:
    conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database="postgres")
    try:
        name: str | None = await conn.fetchval(
            "SELECT application_name FROM pg_stat_activity WHERE pid = $1", pid
        )
        return name
    finally:
        await conn.close()


async def reconnected(listener: Any, connections: int) -> None:
    deadline = time.monotonic() + WAIT
    while listener.connections < connections or not listener.connected.is_set():
        assert time.monotonic() < deadline, "the LISTEN connection never came back"
        await asyncio.sleep(0.02)


@pytest.mark.postgres_only
async def test_a_killed_listen_connection_recovers_and_resends_what_it_missed(
    service: Service, stripe_gateway: StripeGateway
) -> None:
    prices = await setup_catalog(stripe_gateway)
    _customer, subscription_id = await subscribe(service, stripe_gateway, prices, "rt-kill")
    await wait_for_account(service.database, "rt-kill", status="trialing")
    await settle(service.url, service.database)
    listener = service.app.state.realtime.listener
    first_pid = listener.pid
    assert first_pid is not None and await listener_backend(first_pid) == "billing-realtime"

    async with live_socket(service.url, hs256_token("rt-kill")) as socket:
        await socket.subscribe()
        assert (await socket.next_state())[1]["cancelAtPeriodEnd"] is False

        # A change nobody announces (as if its notification was lost: migration 0013's trigger
        # is skipped in replica mode) is not sent ...
        async with service.database.write() as conn:
            await conn.execute(text("SET LOCAL session_replication_role = replica"))
            await conn.execute(text("UPDATE billing_account SET cancel_at_period_end = true"))
        await asyncio.sleep(QUIET)
        assert socket.unread() == []
        # ... until the LISTEN connection dies: once back, it re-reads every watched user.
        await terminate_backend(first_pid)
        await reconnected(listener, 2)
        _at, resent = await socket.next_state()
        assert resent["cancelAtPeriodEnd"] is True and resent["status"] == "TRIALING"
        assert listener.pid not in (None, first_pid)

        # Killed again, and a webhook changes the state at once: the client still gets it.
        await terminate_backend(listener.pid)
        await stripe_gateway.v1.subscriptions.update_async(subscription_id, {"cancel_at_period_end": True})
        await stripe_gateway.v1.subscriptions.update_async(subscription_id, {"cancel_at_period_end": False})
        _at, state = await socket.state_where(lambda s: s["cancelAtPeriodEnd"] is False)
        assert state["status"] == "TRIALING"
        await reconnected(listener, 3)

        # And the new connection carries notifications as the first did.
        committed = watch_commit(service.database, "rt-kill", cancel_at_period_end=True)
        await stripe_gateway.v1.subscriptions.update_async(subscription_id, {"cancel_at_period_end": True})
        at, state = await socket.state_where(lambda s: s["cancelAtPeriodEnd"] is True)
        assert at - await committed < DELIVERY
        assert socket.closed is None


# SQLite and the CLI ---------------------------------------------------------------------------


async def test_billing_sync_and_replay_in_other_processes_reach_a_sqlite_subscriber(tmp_path: Path) -> None:
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'billing.db'}"
    env = {"DATABASE_URL": db_url}
    migrated = await asyncio.to_thread(run, "migrate", env=env, cwd=tmp_path)
    assert migrated.returncode == 0, migrated.stderr
    port = free_port()
    database = Database.from_url(db_url)
    try:
        async with billing_serve(port, env, tmp_path) as served:
            env = {**env, "PUBLIC_BASE_URL": served}
            gateway = sandbox_gateway(served)
            try:
                prices = await sandbox_prices(gateway)
                async with live_socket(served, hs256_token("rt-cli")) as socket:
                    await socket.subscribe()
                    assert (await socket.next_state())[1]["status"] == "NONE"

                    committed = watch_commit(database, "rt-cli", status="trialing")
                    await pay_checkout(served, gateway, prices, "rt-cli")
                    at, state = await socket.state_where(lambda s: s["status"] == "TRIALING")
                    assert at - await committed < DELIVERY
                    await settle(served, database)

                    # Drift written by another process (this one), which announces nothing: the
                    # service's PRAGMA data_version poll notices it.
                    await execute(
                        database, "UPDATE billing_account SET status = 'canceled' WHERE user_id = 'rt-cli'"
                    )
                    written = time.monotonic()
                    at, state = await socket.next_state()
                    assert state["status"] == "CANCELED" and state["hasAccess"] is False
                    assert at - written < DELIVERY

                    # `billing sync`, in its own process, repairs it.
                    committed = watch_commit(database, "rt-cli", status="trialing")
                    synced = await asyncio.to_thread(run, "sync", env=env, cwd=tmp_path)
                    assert synced.returncode == 0, synced.stderr
                    assert "1 drifted (fixed)" in synced.stdout
                    at, state = await socket.next_state()
                    assert state["status"] == "TRIALING" and state["hasAccess"] is True
                    assert at - await committed < DELIVERY

                    # So does `billing events replay`.
                    await execute(
                        database, "UPDATE billing_account SET status = 'canceled' WHERE user_id = 'rt-cli'"
                    )
                    assert (await socket.next_state())[1]["status"] == "CANCELED"
                    ((event_id,),) = await execute(
                        database, "SELECT id FROM stripe_event WHERE type = 'customer.subscription.created'"
                    )
                    committed = watch_commit(database, "rt-cli", status="trialing")
                    replayed = await asyncio.to_thread(
                        run, "events", "replay", event_id, env=env, cwd=tmp_path
                    )
                    assert replayed.returncode == 0, replayed.stderr
                    at, state = await socket.next_state()
                    assert state["status"] == "TRIALING"
                    assert at - await committed < DELIVERY
                    assert socket.unread() == [] and socket.closed is None
            finally:
                await gateway.close()
    finally:
        await database.dispose()
