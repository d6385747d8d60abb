"""`billing webhook-endpoint` against a Stripe stand-in reached with a test key, as a user runs it."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from billing.errors import ConfigurationError
from billing.stripe_gateway import api_version
from billing.webhook_endpoints import ensure_webhook_endpoint, url_problem
from billing.webhooks import HANDLED, WEBHOOK_PATH
from db.engine import Database
from tests.billing_flows import setup_catalog, subscribe, wait_for_account
from tests.conftest import DbTarget, free_port, serve
from tests.processes import run
from tests.stripe_host import StripeHost, stripe_host

OLD_VERSION = "2026-09-30.endive"


@pytest.fixture
def service_port() -> int:
    return free_port()


@pytest.fixture
async def host(sandbox_db: DbTarget, service_port: int) -> AsyncIterator[StripeHost]:
    async with stripe_host(
        sandbox_db, default_webhook_url=f"http://127.0.0.1:{service_port}{WEBHOOK_PATH}"
    ) as running:
        yield running


def command(host: StripeHost, service_port: int, tmp_path: Path, *args: str) -> tuple[int, str, str]:
    env = host.env(PUBLIC_BASE_URL=f"http://127.0.0.1:{service_port}", DATABASE_URL="sqlite+aiosqlite://")
    result = run("webhook-endpoint", *args, env=env, cwd=tmp_path)
    return result.returncode, result.stdout, result.stderr


async def in_thread(host: StripeHost, service_port: int, tmp_path: Path, *args: str) -> tuple[int, str, str]:
    """The command runs as a process; the sandbox it talks to is served by this event loop."""
    return await asyncio.to_thread(command, host, service_port, tmp_path, *args)


async def test_it_creates_one_endpoint_then_finds_nothing_to_change_and_events_arrive_signed(
    host: StripeHost, service_port: int, database: Database, sandbox_db: DbTarget, tmp_path: Path
) -> None:
    url = f"http://127.0.0.1:{service_port}{WEBHOOK_PATH}"
    before = await host.snapshot()
    status, out, err = await in_thread(host, service_port, tmp_path, "--dry-run")
    assert status == 0, err
    assert "would create webhook endpoint" in err and "dry run: nothing changed" in out
    assert await host.snapshot() == before  # the dry run wrote nothing

    status, out, err = await in_thread(host, service_port, tmp_path)
    assert status == 0, err
    [secret] = re.findall(r"signing secret \(shown once.*\): (whsec_\S+)", out)
    assert f"next: set STRIPE_WEBHOOK_SECRET={secret}" in out
    [endpoint] = (await host.gateway.v1.webhook_endpoints.list_async()).data
    assert (endpoint.url, endpoint.status, endpoint.api_version) == (url, "enabled", api_version())
    assert sorted(endpoint.enabled_events) == sorted(HANDLED)
    assert endpoint.metadata.to_dict() == {"managed_by": "billing"}

    settled = await host.snapshot()
    status, out, err = await in_thread(host, service_port, tmp_path)
    assert status == 0, err
    assert f"Stripe already holds webhook endpoint {endpoint.id} for {url}: nothing to change." in out
    assert "whsec_" not in out
    assert await host.snapshot() == settled

    # The service, configured with that secret, gets the sandbox's events and applies them.
    from graph.app import create_app

    settings = host.settings(public_base_url=f"http://127.0.0.1:{service_port}", stripe_webhook_secret=secret)
    assert not settings.sandbox_mode
    app = create_app(settings, database=database)
    async with serve(app, service_port):
        prices = await setup_catalog(host.gateway)
        await subscribe(host.as_service(database, sandbox_db), host.gateway, prices, "going_live_user")
        row = await wait_for_account(database, "going_live_user", tier="starter")
    assert row.stripe_subscription_id is not None


async def test_a_disabled_endpoint_with_other_events_is_updated_in_place(
    host: StripeHost, service_port: int, tmp_path: Path
) -> None:
    url = f"http://127.0.0.1:{service_port}{WEBHOOK_PATH}"
    v1 = host.gateway.v1
    existing = await v1.webhook_endpoints.create_async(
        {"url": url, "enabled_events": ["customer.updated", "charge.succeeded"], "api_version": api_version()}  # type: ignore[typeddict-item]
    )
    await v1.webhook_endpoints.update_async(existing.id, {"disabled": True})
    gone = await v1.webhook_endpoints.create_async(
        {
            "url": "https://old.example.com/webhooks/stripe",
            "enabled_events": ["*"],
            "metadata": {"managed_by": "billing"},
        }
    )

    status, out, err = await in_thread(host, service_port, tmp_path)
    assert status == 0, err
    assert f"note: {gone.id}, also managed by this service, points at https://old.example.com" in out
    assert "-charge.succeeded" in err and "+invoice.paid" in err and f"enable {existing.id}" in err
    assert "whsec_" not in out  # no new endpoint, no new secret
    [endpoint] = [e for e in (await v1.webhook_endpoints.list_async()).data if e.id != gone.id]
    assert endpoint.id == existing.id
    assert endpoint.status == "enabled"
    assert sorted(endpoint.enabled_events) == sorted(HANDLED)


async def test_another_api_version_gets_a_new_endpoint_beside_it_and_rotation_steps(
    host: StripeHost, service_port: int, tmp_path: Path
) -> None:
    url = f"http://127.0.0.1:{service_port}{WEBHOOK_PATH}"
    v1 = host.gateway.v1
    old = await v1.webhook_endpoints.create_async(
        {"url": url, "enabled_events": sorted(HANDLED), "api_version": OLD_VERSION}  # type: ignore[typeddict-item]
    )
    status, out, err = await in_thread(host, service_port, tmp_path, "--dry-run")
    assert status == 0, err
    assert f"{old.id} at {url} uses another API version" in out
    assert len((await v1.webhook_endpoints.list_async()).data) == 1

    status, out, err = await in_thread(host, service_port, tmp_path)
    assert status == 0, err
    [secret] = re.findall(r"signing secret \(shown once.*\): (whsec_\S+)", out)
    assert f"STRIPE_WEBHOOK_SECRET={secret},<the old endpoint's secret>" in out
    assert f"stripe webhook_endpoints delete {old.id}" in out
    versions = sorted(e.api_version or "" for e in (await v1.webhook_endpoints.list_async()).data)
    assert versions == sorted([OLD_VERSION, api_version()])

    status, out, _err = await in_thread(host, service_port, tmp_path)  # both stay until deleted
    assert "nothing to change" in out and len((await v1.webhook_endpoints.list_async()).data) == 2


@pytest.mark.parametrize(
    "url",
    [
        "http://billing.example.com/webhooks/stripe",
        "https://127.0.0.1/webhooks/stripe",
        "https://10.1.2.3/webhooks/stripe",
        "https://localhost:8000/webhooks/stripe",
        "https://[::1]/webhooks/stripe",
    ],
)
async def test_a_live_key_refuses_a_url_stripe_cannot_reach_before_any_call(
    host: StripeHost, url: str
) -> None:
    before = await host.snapshot()
    with pytest.raises(ConfigurationError, match="refusing the webhook URL"):
        await ensure_webhook_endpoint(gateway=host.gateway, url=url, live=True)
    assert await host.snapshot() == before
    assert url_problem("https://billing.example.com/webhooks/stripe", live=True) is None
    assert url_problem(url, live=False) is None  # test mode: `stripe listen` and tunnels are fine


def test_without_a_url_it_names_the_setting(tmp_path: Path) -> None:
    result = run(
        "webhook-endpoint",
        env={"STRIPE_SECRET_KEY": "sk_test_x", "DATABASE_URL": "sqlite+aiosqlite://", "PUBLIC_BASE_URL": ""},
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "error: no webhook URL: set PUBLIC_BASE_URL" in result.stderr


def test_sandbox_mode_needs_no_endpoint_and_says_so(tmp_path: Path) -> None:
    result = run("webhook-endpoint", env={"DATABASE_URL": "sqlite+aiosqlite://"}, cwd=tmp_path)
    assert result.returncode == 1
    assert (
        "error: STRIPE_SECRET_KEY is not set: in sandbox mode the sandbox already delivers" in result.stderr
    )


def test_the_event_list_for_stripe_listen_in_the_docs_is_the_handled_list() -> None:
    page = (Path(__file__).resolve().parents[1] / "docs" / "going-live.md").read_text()
    [listed] = re.findall(r"--events (\S+)", page)
    assert listed.split(",") == sorted(HANDLED)
