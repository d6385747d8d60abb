"""`billing trigger`, run as a developer runs it: a process against a running `billing serve`.

The service runs on SQLite in its own process; the trigger drives its sandbox over HTTP, the
sandbox delivers the events to the service's webhook route, and the service's own database
(read here with `db.engine.Database`) shows the result.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from cli.trigger import SUPPORTED
from db.engine import Database
from db.models import account_table, event_table
from tests.conftest import free_port
from tests.processes import BILLING, billing_serve

EVENT_LINE = re.compile(r"^\s+([a-z_.]+)\s+(evt_\w+)$", re.MULTILINE)


def billing(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BILLING, *args], env={**os.environ, **env}, cwd=cwd, capture_output=True, text=True, timeout=120
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.strip().splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@dataclass
class Served:
    url: str
    env: dict[str, str]
    cwd: Path
    database_url: str

    def trigger(self, *args: str) -> subprocess.CompletedProcess[str]:
        return billing("trigger", *args, env=self.env, cwd=self.cwd)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """`billing migrate` then `billing serve` on SQLite, on a free port, with PUBLIC_BASE_URL set."""
    cwd = tmp_path_factory.mktemp("trigger")
    database_url = f"sqlite+aiosqlite:///{cwd / 'billing.db'}"
    env = {"DATABASE_URL": database_url}
    migrated = billing("migrate", env=env, cwd=cwd)
    assert migrated.returncode == 0, migrated.stderr
    with billing_serve(env, cwd) as (url,):
        yield Served(url, {**env, "PUBLIC_BASE_URL": url}, cwd, database_url)


def printed_events(stdout: str) -> list[tuple[str, str]]:
    return EVENT_LINE.findall(stdout)


async def wait_for(database_url: str, user_id: str, **expected: Any) -> Any:
    """Poll the service's database until the user's account shows `expected`."""
    database = Database.from_url(database_url)
    row = None
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            async with database.read() as conn:
                row = (
                    await conn.execute(select(account_table).where(account_table.c.user_id == user_id))
                ).first()
            if row is not None and all(getattr(row, key) == value for key, value in expected.items()):
                return row
            await asyncio.sleep(0.1)
    finally:
        await database.dispose()
    raise AssertionError(f"account {user_id} never reached {expected}; last seen {row}")


async def stored_events(database_url: str, ids: list[str]) -> dict[str, str]:
    """The service's inbox: event id -> status, for `ids`."""
    database = Database.from_url(database_url)
    try:
        async with database.read() as conn:
            rows = await conn.execute(
                select(event_table.c.id, event_table.c.status).where(event_table.c.id.in_(ids))
            )
            return {row.id: row.status for row in rows}
    finally:
        await database.dispose()


async def test_checkout_session_completed_reaches_the_service(served: Served) -> None:
    result = served.trigger("checkout.session.completed", "--user", "trig_u1")

    assert result.returncode == 0, result.stderr
    events = printed_events(result.stdout)
    types = [event_type for event_type, _id in events]
    assert types[0] == "customer.created" and "customer.subscription.created" in types
    assert types[-1] == "checkout.session.completed"
    assert "trig_u1" in result.stdout and "delivered to" in result.stdout
    row = await wait_for(served.database_url, "trig_u1", status="active", tier="starter", interval="monthly")
    assert row.stripe_customer_id.startswith("cus_") and row.stripe_subscription_id.startswith("sub_")
    assert row.stripe_customer_id in result.stdout
    inbox = await stored_events(served.database_url, [event_id for _type, event_id in events])
    assert set(inbox) == {event_id for _type, event_id in events}  # every printed event was delivered


async def test_invoice_payment_failed_makes_the_account_past_due(served: Served) -> None:
    result = served.trigger("invoice.payment_failed", "--user", "trig_u2")

    assert result.returncode == 0, result.stderr
    types = [event_type for event_type, _id in printed_events(result.stdout)]
    renewal = types[types.index("checkout.session.completed") + 1 :]
    assert renewal[:4] == [
        "invoice.created",
        "customer.subscription.updated",
        "invoice.finalized",
        "invoice.payment_failed",
    ]
    assert "card fails" in result.stdout and "advance the sandbox clock" in result.stdout
    await wait_for(served.database_url, "trig_u2", status="past_due", tier="starter")

    # The same user again: the existing subscription is used, not a new checkout.
    again = served.trigger("customer.subscription.updated", "--user", "trig_u2")
    assert again.returncode == 0, again.stderr
    assert "using subscription sub_" in again.stdout and "checkout" not in again.stdout
    assert [t for t, _id in printed_events(again.stdout)] == ["customer.subscription.updated"]
    await wait_for(served.database_url, "trig_u2", cancel_at_period_end=True)


async def test_the_user_defaults_to_a_new_trigger_user(served: Served) -> None:
    result = served.trigger("customer.updated")

    assert result.returncode == 0, result.stderr
    user = re.search(r"for user (trigger_[0-9a-f]{8}) ", result.stdout)
    assert user is not None
    assert [t for t, _id in printed_events(result.stdout)] == ["customer.created", "customer.updated"]
    await wait_for(served.database_url, user.group(1), status="none")


def test_an_unknown_event_type_is_a_usage_error_listing_the_supported_ones(tmp_path: Path) -> None:
    result = billing("trigger", "invoice.exploded", env={}, cwd=tmp_path)

    assert result.returncode == 2
    assert "Usage:" in result.stderr and "invoice.exploded" in result.stderr
    for event_type in SUPPORTED:
        assert event_type in result.stderr


def test_outside_sandbox_mode_it_refuses_in_one_line(tmp_path: Path) -> None:
    live = billing("trigger", "invoice.paid", env={"STRIPE_SECRET_KEY": "sk_test_real_stripe"}, cwd=tmp_path)
    assert "stripe trigger" in one_error_line(live)
    assert live.stdout == ""

    production = billing("trigger", "invoice.paid", env={"ENVIRONMENT": "production"}, cwd=tmp_path)
    assert "STRIPE_SECRET_KEY" in one_error_line(production)


def test_without_a_running_service_it_says_so_in_one_line(tmp_path: Path) -> None:
    env = {"PUBLIC_BASE_URL": f"http://127.0.0.1:{free_port()}"}
    result = billing("trigger", "checkout.session.completed", env=env, cwd=tmp_path)
    line = one_error_line(result)
    assert "BILLING_PROVIDER_UNAVAILABLE" in line and "billing serve" in line
