"""The `billing` command line, run as a user runs it: a separate process."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port
from tests.processes import assert_one_clear_line, billing_serve, run

BILLING = str(Path(sys.executable).with_name("billing"))


@pytest.fixture
def sqlite_env(tmp_path: Path) -> dict[str, str]:
    return {"DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'billing.db'}"}


def test_help_lists_every_command() -> None:
    from cli.main import main

    result = run("--help")
    assert result.returncode == 0
    for command in main.commands:
        assert command in result.stdout


@pytest.mark.parametrize("args", [["frobnicate"], ["migrate", "--no-such-option"], ["serve", "--port", "0"]])
def test_bad_usage_prints_usage_and_exits_2(args: list[str]) -> None:
    result = run(*args)
    assert result.returncode == 2
    assert "Usage:" in result.stderr


def test_migrate_creates_the_sqlite_database(tmp_path: Path, sqlite_env: dict[str, str]) -> None:
    result = run("migrate", env=sqlite_env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "billing.db").exists()
    assert run("migrate", env=sqlite_env, cwd=tmp_path).returncode == 0  # twice is fine


def test_migrate_on_postgresql(fresh_pg_url: str, tmp_path: Path) -> None:
    result = run("migrate", env={"DATABASE_URL": fresh_pg_url}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("command", ["migrate", "serve"])
def test_an_unparsable_database_url_is_one_clear_line(command: str, tmp_path: Path) -> None:
    result = run(command, env={"DATABASE_URL": "this is not a url"}, cwd=tmp_path)
    assert_one_clear_line(result, "DATABASE_URL")


@pytest.mark.parametrize("command", ["migrate", "serve"])
def test_an_unreachable_database_is_one_clear_line(command: str, tmp_path: Path) -> None:
    url = "postgresql+asyncpg://postgres:hunter2@127.0.0.1:1/none"
    result = run(command, env={"DATABASE_URL": url}, cwd=tmp_path)
    assert_one_clear_line(result, "DATABASE_URL")
    assert "hunter2" not in result.stderr


def test_serve_refuses_an_unmigrated_database(tmp_path: Path, sqlite_env: dict[str, str]) -> None:
    result = run("serve", "--port", str(free_port()), env=sqlite_env, cwd=tmp_path)
    assert_one_clear_line(result, "billing migrate")


def test_serve_refuses_a_production_configuration_naming_the_setting(
    tmp_path: Path, sqlite_env: dict[str, str]
) -> None:
    result = run("serve", env={**sqlite_env, "ENVIRONMENT": "production"}, cwd=tmp_path)
    assert_one_clear_line(result, "STRIPE_SECRET_KEY")


@pytest.fixture
def served(tmp_path: Path, sqlite_env: dict[str, str]) -> Iterator[str]:
    assert run("migrate", env=sqlite_env, cwd=tmp_path).returncode == 0
    with billing_serve(sqlite_env, tmp_path) as (url,):
        yield url


def test_serve_answers_health_probes_and_graphql(served: str) -> None:
    assert httpx.get(f"{served}/readyz").json() == {"status": "ready"}
    graphiql = httpx.get(f"{served}/graphql", headers={"Accept": "text/html"})
    assert graphiql.status_code == 200 and "graphiql" in graphiql.text.lower()
    answer = httpx.post(f"{served}/graphql", json={"query": "{ __typename }"})
    assert answer.json() == {"data": {"__typename": "Query"}}


def test_catalog_sync_against_the_running_sandbox(
    served: str, tmp_path: Path, sqlite_env: dict[str, str]
) -> None:
    env = {**sqlite_env, "PUBLIC_BASE_URL": served}
    deadline = time.monotonic() + 30
    while True:  # the service syncs its sandbox at start-up; then there is nothing left to do
        result = run("catalog", "sync", env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        if "nothing to change" in result.stdout or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert "nothing to change" in result.stdout
    dry = run("catalog", "sync", "--dry-run", env=env, cwd=tmp_path)
    assert dry.returncode == 0 and "nothing to change" in dry.stdout


def test_catalog_sync_without_a_running_sandbox_is_one_clear_line(
    tmp_path: Path, sqlite_env: dict[str, str]
) -> None:
    env = {**sqlite_env, "PUBLIC_BASE_URL": f"http://127.0.0.1:{free_port()}"}
    result = run("catalog", "sync", env=env, cwd=tmp_path)
    assert_one_clear_line(result, "BILLING_PROVIDER_UNAVAILABLE", "billing serve")


def test_an_invalid_plans_file_is_one_clear_line(tmp_path: Path, sqlite_env: dict[str, str]) -> None:
    plans = tmp_path / "plans.toml"
    plans.write_text('[tiers.gold]\nname = "Gold"\n')
    result = run("catalog", "sync", env={**sqlite_env, "BILLING_PLANS_FILE": str(plans)}, cwd=tmp_path)
    assert_one_clear_line(result, str(plans), "tiers")


async def _subscribed_user(base: str, db_url: str, user_id: str) -> None:
    """Check out and pay through the running service's sandbox; wait for the webhook to land."""
    from db.engine import Database
    from tests.billing_flows import checkout, wait_for_account
    from tests.gateways import sandbox_gateway

    gateway = sandbox_gateway(base)
    database = Database.from_url(db_url)
    try:
        prices: dict[str, str] = {}
        for _ in range(200):  # the service syncs its catalog into the sandbox at start-up
            listed = await gateway.v1.prices.list_async({"lookup_keys": ["starter_monthly"]})
            if listed.data:
                prices = {"starter_monthly": listed.data[0].id}
                break
            await asyncio.sleep(0.1)
        _, session_id = await checkout(gateway, prices, user_id)
        async with httpx.AsyncClient() as client:
            done = await client.post(
                f"{base}/sandbox/_control/checkout/{session_id}/complete", json={"outcome": "paid"}
            )
        assert done.status_code == 200, done.text
        await wait_for_account(database, user_id, status="trialing")
    finally:
        await gateway.close()
        await database.dispose()


async def _settled(base: str, db_url: str) -> None:
    from db.engine import Database
    from tests.billing_flows import settle

    database = Database.from_url(db_url)
    try:
        await settle(base, database)
    finally:
        await database.dispose()


async def _execute(db_url: str, sql: str) -> list[Any]:
    from sqlalchemy import text

    from db.engine import Database

    database = Database.from_url(db_url)
    try:
        async with database.write() as conn:
            result = await conn.execute(text(sql))
            return list(result.all()) if result.returns_rows else []
    finally:
        await database.dispose()


async def test_billing_sync_reports_then_repairs_drift(
    served: str, tmp_path: Path, sqlite_env: dict[str, str]
) -> None:
    env = {**sqlite_env, "PUBLIC_BASE_URL": served}
    db_url = sqlite_env["DATABASE_URL"]
    await _subscribed_user(served, db_url, "u-cli")
    await _settled(served, db_url)  # late webhooks would repair the drift before `billing sync` sees it
    await _execute(db_url, "UPDATE billing_account SET status = 'canceled' WHERE user_id = 'u-cli'")

    dry = await asyncio.to_thread(run, "sync", "--dry-run", env=env, cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert "drift: user u-cli" in dry.stdout and "status: 'canceled' -> 'trialing'" in dry.stdout
    assert "would fix" in dry.stdout
    assert await _execute(db_url, "SELECT status FROM billing_account") == [("canceled",)]

    fixed = await asyncio.to_thread(run, "sync", env=env, cwd=tmp_path)
    assert fixed.returncode == 0, fixed.stderr
    assert "syncing customers" in fixed.stderr  # the progress bar
    assert "1 drifted (fixed)" in fixed.stdout
    assert await _execute(db_url, "SELECT status FROM billing_account") == [("trialing",)]
    again = await asyncio.to_thread(run, "sync", env=env, cwd=tmp_path)
    assert "0 drifted" in again.stdout


async def test_billing_events_replay(served: str, tmp_path: Path, sqlite_env: dict[str, str]) -> None:
    env = {**sqlite_env, "PUBLIC_BASE_URL": served}
    db_url = sqlite_env["DATABASE_URL"]
    await _subscribed_user(served, db_url, "u-replay")
    ((event_id,),) = await _execute(
        db_url, "SELECT id FROM stripe_event WHERE type = 'customer.subscription.created'"
    )
    await _execute(
        db_url, f"UPDATE stripe_event SET status = 'failed', last_error = 'boom' WHERE id = '{event_id}'"
    )

    replayed = await asyncio.to_thread(run, "events", "replay", "--failed", env=env, cwd=tmp_path)
    assert replayed.returncode == 0, replayed.stderr
    assert "1 event(s) replayed: 1 processed" in replayed.stdout
    assert await _execute(db_url, f"SELECT status, last_error FROM stripe_event WHERE id = '{event_id}'") == [
        ("processed", None)
    ]

    one = await asyncio.to_thread(run, "events", "replay", event_id, env=env, cwd=tmp_path)
    assert one.returncode == 0 and "1 event(s) replayed" in one.stdout
    missing = await asyncio.to_thread(run, "events", "replay", "evt_missing", env=env, cwd=tmp_path)
    assert missing.returncode == 1 and "no stored event evt_missing" in missing.stderr
    neither = await asyncio.to_thread(run, "events", "replay", env=env, cwd=tmp_path)
    assert neither.returncode == 2
