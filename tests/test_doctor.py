"""`billing doctor`: passes on a ready set-up; names the check and the fix of each fault; writes nothing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import insert

from billing.clock import utcnow
from billing.doctor import DoctorReport, run_checks
from billing.plans import load_catalog
from billing.settings import Settings
from billing.webhook_endpoints import ensure_webhook_endpoint
from billing.webhooks import HANDLED, WEBHOOK_PATH
from db.engine import Database
from db.migrate import migration_state, upgrade
from db.models import event_table
from tests.billing_flows import setup_catalog
from tests.conftest import DbTarget, free_port
from tests.db_snapshot import snapshot
from tests.processes import run
from tests.stripe_host import StripeHost, stripe_host

CHECKS = [
    "settings",
    "database",
    "public-url",
    "stripe-key",
    "api-version",
    "webhook-endpoint",
    "webhook-secret",
    "catalog",
    "portal",
    "meters",
    "webhook-inbox",
    "usage-reporting",
]


@dataclass
class Ready:
    host: StripeHost
    settings: Settings
    endpoint_id: str
    database: Database

    async def check(
        self, *, settings: Settings | None = None, database: Database | None = None
    ) -> DoctorReport:
        return await run_checks(
            settings=settings or self.settings,
            catalog=load_catalog(),
            database=database or self.database,
            gateway=self.host.gateway,
            now=utcnow(),
        )


@pytest.fixture
async def ready(database: Database, sandbox_db: DbTarget) -> AsyncIterator[Ready]:
    """A set-up that is ready: catalog synced, endpoint created, secret configured, inbox clean."""
    public = f"http://127.0.0.1:{free_port()}"
    async with stripe_host(sandbox_db, default_webhook_url=f"{public}{WEBHOOK_PATH}", deliver=False) as host:
        await setup_catalog(host.gateway)
        created = await ensure_webhook_endpoint(
            gateway=host.gateway, url=f"{public}{WEBHOOK_PATH}", live=False
        )
        assert created.endpoint_id is not None and created.secret is not None
        settings = host.settings(public_base_url=public, stripe_webhook_secret=created.secret)
        yield Ready(host, settings, created.endpoint_id, database)


async def test_a_ready_set_up_passes_every_check(ready: Ready) -> None:
    report = await ready.check()
    assert [check.name for check in report.checks] == CHECKS
    assert report.ok, [check.line() for check in report.checks]
    statuses = {check.name: check.status for check in report.checks}
    assert statuses.pop("settings") == "warn"  # ENVIRONMENT=development
    assert set(statuses.values()) == {"ok"}, report.checks
    assert "test mode" in report.get("stripe-key").detail


async def _no_endpoint(ready: Ready) -> None:
    await ready.host.gateway.v1.webhook_endpoints.delete_async(ready.endpoint_id)


async def _disabled(ready: Ready) -> None:
    await ready.host.gateway.v1.webhook_endpoints.update_async(ready.endpoint_id, {"disabled": True})


async def _event_missing(ready: Ready) -> None:
    events = sorted(HANDLED - {"invoice.paid"})
    await ready.host.gateway.v1.webhook_endpoints.update_async(ready.endpoint_id, {"enabled_events": events})  # type: ignore[typeddict-item]


async def _catalog_drift(ready: Ready) -> None:
    products = await ready.host.gateway.v1.products.list_async({"limit": 100})
    starter = next(p for p in products.data if p.metadata and p.metadata.to_dict().get("tier") == "starter")
    await ready.host.gateway.v1.products.update_async(starter.id, {"name": "Renamed in the Dashboard"})


async def _failed_event(ready: Ready) -> None:
    now = utcnow()
    async with ready.database.write() as conn:
        await conn.execute(
            insert(event_table).values(
                id="evt_doctor_failed",
                type="invoice.paid",
                stripe_created=now - timedelta(hours=1),
                received_at=now - timedelta(hours=1),
                status="failed",
                attempts=12,
                last_error="boom: the sync raised",
                payload={"id": "evt_doctor_failed", "type": "invoice.paid"},
            )
        )


async def _nothing(ready: Ready) -> None:
    return None


Fault = Callable[[Ready], Awaitable[None]]


@pytest.mark.parametrize(
    ("fault", "live", "check", "detail", "fix"),
    [
        (
            _no_endpoint,
            False,
            "webhook-endpoint",
            "no webhook endpoint for http://127.0.0.1:",
            "billing webhook-endpoint",
        ),
        (_disabled, False, "webhook-endpoint", "is disabled", "billing webhook-endpoint"),
        (_event_missing, False, "webhook-endpoint", "is not sent invoice.paid", "billing webhook-endpoint"),
        (_catalog_drift, False, "catalog", "update product", "billing catalog sync"),
        (
            _failed_event,
            False,
            "webhook-inbox",
            "1 event(s) failed for good",
            "billing events replay --failed",
        ),
        (_nothing, True, "public-url", "loopback or private address", "PUBLIC_BASE_URL"),
    ],
    ids=[
        "no-endpoint",
        "endpoint-disabled",
        "event-missing",
        "catalog-drift",
        "failed-event",
        "live-loopback",
    ],
)
async def test_each_fault_fails_naming_the_check_and_the_fix_and_nothing_is_written(
    ready: Ready, fault: Fault, live: bool, check: str, detail: str, fix: str
) -> None:
    await fault(ready)
    settings = ready.settings
    if live:
        # The key's mode is read from its prefix; the calls still reach the test stand-in.
        settings = Settings(
            **{**settings.model_dump(), "stripe_secret_key": "sk_live_" + "x" * 24, "stripe_api_base": None}
        )
    stripe_before, database_before = await ready.host.snapshot(), await snapshot(ready.database)

    report = await ready.check(settings=settings)

    assert not report.ok
    failed = [c for c in report.checks if c.status == "fail"]
    assert [c.name for c in failed] == [check], [c.line() for c in report.checks]
    assert detail in failed[0].detail and failed[0].fix is not None and fix in failed[0].fix
    assert await ready.host.snapshot() == stripe_before
    assert await snapshot(ready.database) == database_before


async def test_a_database_that_is_not_migrated_fails_and_stays_unmigrated(
    ready: Ready, blank_db: DbTarget
) -> None:
    blank = blank_db.database()
    try:
        stripe_before = await ready.host.snapshot()
        report = await ready.check(database=blank)
        database = report.get("database")
        assert (database.status, database.fix) == ("fail", "run `billing migrate`")
        assert "not migrated" in database.detail
        names = [c.name for c in report.checks]
        assert "webhook-inbox" not in names and "usage-reporting" not in names  # need the database
        assert (await migration_state(blank.engine)).current is None
        assert await ready.host.snapshot() == stripe_before
    finally:
        await blank.dispose()


async def test_an_old_endpoint_left_from_a_rotation_is_a_warning(ready: Ready) -> None:
    assert ready.settings.public_base_url is not None
    old = await ready.host.gateway.v1.webhook_endpoints.create_async(
        {
            "url": f"{ready.settings.public_base_url}{WEBHOOK_PATH}",
            "enabled_events": sorted(HANDLED),  # type: ignore[typeddict-item]
            "api_version": "2026-09-30.endive",
        }
    )
    report = await ready.check()
    assert report.ok
    check = report.get("webhook-endpoint")
    assert check.status == "warn" and old.id in check.detail and ready.endpoint_id in check.detail
    assert check.fix is not None and f"stripe webhook_endpoints delete {old.id}" in check.fix


# The command ------------------------------------------------------------------------------------


@pytest.mark.sqlite_only
async def test_the_command_prints_a_line_per_check_exits_1_on_a_failure_and_speaks_json(
    ready: Ready, tmp_path: Path
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'doctor.db'}"
    await asyncio.to_thread(upgrade, url)
    assert ready.settings.stripe_webhook_secret is not None and ready.settings.public_base_url
    env = ready.host.env(
        DATABASE_URL=url,
        PUBLIC_BASE_URL=ready.settings.public_base_url,
        STRIPE_WEBHOOK_SECRET=ready.settings.stripe_webhook_secret.get_secret_value(),
        APP_URL="http://app.test",
    )

    def doctor(*args: str) -> tuple[int, str]:
        result = run("doctor", *args, env=env, cwd=tmp_path)
        assert "Traceback" not in result.stderr, result.stderr
        return result.returncode, result.stdout

    status, out = await asyncio.to_thread(doctor)
    assert status == 0, out
    lines = out.strip().splitlines()
    assert [line.split()[1].rstrip(":") for line in lines[:-1]] == CHECKS
    assert lines[-1].startswith("ready: every check passed")

    await _disabled(ready)
    status, out = await asyncio.to_thread(doctor)
    assert status == 1
    [line] = [line for line in out.splitlines() if line.startswith("fail")]
    assert line.startswith("fail webhook-endpoint: ") and "-> fix: run `billing webhook-endpoint`" in line
    assert out.strip().splitlines()[-1] == "not ready: 1 check(s) failed (webhook-endpoint)"

    status, out = await asyncio.to_thread(doctor, "--json")
    assert status == 1
    parsed = json.loads(out)
    assert parsed["ok"] is False
    assert [c["name"] for c in parsed["checks"] if c["status"] == "fail"] == ["webhook-endpoint"]


def test_settings_production_refuses_are_the_failed_check(tmp_path: Path) -> None:
    result = run(
        "doctor", env={"ENVIRONMENT": "production", "DATABASE_URL": "sqlite+aiosqlite://"}, cwd=tmp_path
    )
    assert result.returncode == 1, result.stderr
    first, last = result.stdout.strip().splitlines()[0], result.stdout.strip().splitlines()[-1]
    assert first.startswith("fail settings: invalid settings: ") and "STRIPE_SECRET_KEY is not set" in first
    assert "-> fix: correct the named settings" in first
    assert last == "not ready: 1 check(s) failed (settings)"
