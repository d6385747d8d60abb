"""Secrets never reach a log line, an error, a response or `/readyz`.

The Stripe key, both webhook secrets (rotation), the JWT secret, the service key, the metrics
token and a database password are set to distinctive values; representative flows run with every
logger at DEBUG (ours, Stripe's SDK, httpx, httpcore, uvicorn, SQLAlchemy), and no captured line
(as text and as LOG_FORMAT=json writes it), response body, header or CLI output may contain any
of them, nor any 12-character piece of their random part.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import traceback
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import strawberry
from click.testing import CliRunner
from sqlalchemy import select
from strawberry.tools import merge_types

from billing.logs import ContextFilter, json_formatter
from billing.stripe_gateway import GatewayConfig, StripeGateway
from cli.main import main
from db.engine import Database
from db.migrate import upgrade
from db.models import event_table
from graph.context import context_of
from graph.schema import Query as BillingQuery
from graph.schema import build_schema
from tests.billing_flows import setup_catalog
from tests.conftest import DbTarget, free_port, running_service
from tests.gateways import open_sandbox_gateway
from tests.graphql_support import Api, error_codes, hs256_token, serve_api
from tests.stripe_events import event, post_event, sign

RANDOM = {
    name: secrets.token_hex(16) for name in ("stripe", "hook1", "hook2", "jwt", "service", "db", "metrics")
}
STRIPE_KEY = f"sk_test_{RANDOM['stripe']}"
WEBHOOK_SECRETS = [f"whsec_{RANDOM['hook1']}", f"whsec_{RANDOM['hook2']}"]
JWT_SECRET = f"jwt-{RANDOM['jwt']}"
SERVICE_KEY = f"svc-{RANDOM['service']}"
DB_PASSWORD = f"pw{RANDOM['db']}"
METRICS_TOKEN = f"mt-{RANDOM['metrics']}"
WINDOW = 12


def secret_settings(**overrides: Any) -> dict[str, Any]:
    return {
        "stripe_secret_key": STRIPE_KEY,
        "stripe_webhook_secret": ",".join(WEBHOOK_SECRETS),
        "auth_jwt_secret": JWT_SECRET,
        "service_api_key": SERVICE_KEY,
        "metrics_token": METRICS_TOKEN,
        **overrides,
    }


def secret_env() -> dict[str, str]:
    return {key.upper(): str(value) for key, value in secret_settings().items()}


def leaks(text: str) -> list[str]:
    """The names of the secrets `text` shows, whole or any `WINDOW`-character piece."""
    found = []
    for name, value in RANDOM.items():
        pieces = {value[i : i + WINDOW] for i in range(len(value) - WINDOW + 1)}
        if any(piece in text for piece in pieces):
            found.append(name)
    return found


class Evidence:
    """Everything a flow showed: responses (status, headers, body), log records, CLI output."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def response(self, response: httpx.Response) -> httpx.Response:
        headers = "\n".join(f"{key}: {value}" for key, value in response.headers.items())
        self.texts.append(f"{response.status_code}\n{headers}\n{response.text}")
        return response

    def logs(self, caplog: pytest.LogCaptureFixture) -> None:
        formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
        for record in caplog.records:
            text = formatter.format(record)
            if record.exc_info and record.exc_info[1] is not None:
                text += "\n" + "".join(traceback.format_exception(record.exc_info[1]))
            self.texts.append(text)
        # The same records as LOG_FORMAT=json writes them (the handler has the JSON formatter and
        # the context filter: every_logger_at_debug): every line parses, and our own lines and
        # the access log show no email either (SQLAlchemy's DEBUG lines show statement parameters).
        for line in caplog.text.splitlines():
            fields = json.loads(line)
            assert {"time", "level", "logger", "message"} <= fields.keys(), line
            self.texts.append(line)
            if fields["logger"].startswith(("billing", "graph", "uvicorn", "strawberry")):
                assert "@example.test" not in line, line

    def check(self) -> None:
        assert self.texts
        shown = [(leaks(text), text[:2000]) for text in self.texts if leaks(text)]
        assert shown == [], shown


@pytest.fixture
def every_logger_at_debug(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    names = ["", "billing", "stripe", "httpx", "httpcore", "uvicorn", "uvicorn.error", "uvicorn.access"]
    names += ["sqlalchemy", "sqlalchemy.engine", "asyncpg", "aiosqlite", "strawberry", "alembic"]
    names += list(logging.root.manager.loggerDict)
    for name in dict.fromkeys(names):
        caplog.set_level(logging.DEBUG, logger=name)
    caplog.handler.addFilter(ContextFilter())
    caplog.handler.setFormatter(json_formatter())
    yield caplog


def test_the_leak_detector_sees_pieces() -> None:
    assert leaks(f"key=...{STRIPE_KEY[10:24]}...") == ["stripe"]
    assert leaks(f"sk_test_****{RANDOM['stripe'][-4:]}") == []  # Stripe's own masking shows 4


# The service ----------------------------------------------------------------------------------


@asynccontextmanager
async def stripe_and_service(database: Database, sandbox_db: DbTarget) -> AsyncIterator[tuple[str, Api]]:
    """The sandbox (in a sandbox-mode app), and the service with the distinctive secrets using it."""
    async with running_service(
        database, sandbox_db, webhook_worker=False, sandbox={"deliver_webhooks": False}
    ) as stripe_host:
        api_base = f"{stripe_host.url}/sandbox"
        async with open_sandbox_gateway(stripe_host.url, api_key=STRIPE_KEY) as gateway:
            await setup_catalog(gateway)
        async with serve_api(
            database, **secret_settings(stripe_api_base=api_base, webhook_worker=True)
        ) as api:
            yield stripe_host.url, api


async def test_checkout_and_webhooks_show_no_secret(
    database: Database, sandbox_db: DbTarget, every_logger_at_debug: pytest.LogCaptureFixture
) -> None:
    evidence = Evidence()
    user = hs256_token("secretive", secret=JWT_SECRET, email="secretive@example.test")
    wrong = hs256_token("secretive", secret="another-secret-of-at-least-32-chars!")
    async with stripe_and_service(database, sandbox_db) as (stripe_url, api), httpx.AsyncClient() as client:
        created = evidence.response(
            await api.post(
                "mutation { createCheckoutSession(tier: STARTER, interval: MONTHLY) { id url } }", token=user
            )
        ).json()
        session_id = created["data"]["createCheckoutSession"]["id"]
        async with httpx.AsyncClient(timeout=30) as sandbox:
            paid = await sandbox.post(
                f"{stripe_url}/sandbox/_control/checkout/{session_id}/complete", json={"outcome": "paid"}
            )
        assert paid.status_code == 200
        confirmed = evidence.response(
            await api.post(
                "mutation($id: ID!) { confirmCheckoutSession(sessionId: $id) { status tier } }",
                {"id": session_id},
                token=user,
            )
        ).json()
        portal = evidence.response(await api.post("mutation { createPortalSession { url } }", token=user))
        service = evidence.response(
            await api.post(
                '{ userSubscription(userId: "secretive") { tier } }',
                headers={"Authorization": f"Bearer {SERVICE_KEY}"},
            )
        )
        refused_tokens = [
            evidence.response(await api.post("{ viewer { id } }", token=wrong)),
            evidence.response(
                await api.post("{ viewer { id } }", headers={"Authorization": f"Bearer {SERVICE_KEY}x"})
            ),
        ]
        customer = paid.json()["session"]["customer"]
        hook = event(
            "customer.updated", {"id": customer, "object": "customer", "metadata": {"userId": "secretive"}}
        )
        accepted = evidence.response(await post_event(client, api.url, hook, secret=WEBHOOK_SECRETS[1]))
        bad = [
            evidence.response(await post_event(client, api.url, hook, header="t=1,v1=deadbeef")),
            evidence.response(await post_event(client, api.url, hook, secret="whsec_not_one_of_ours")),
            evidence.response(
                await post_event(client, api.url, hook, header=sign(b"other", WEBHOOK_SECRETS[0]))
            ),
            evidence.response(
                await post_event(client, api.url, hook, secret=WEBHOOK_SECRETS[0], timestamp=1)
            ),
        ]
        scraped = [
            evidence.response(await client.get(f"{api.url}/metrics", headers={"Authorization": auth}))
            for auth in (f"Bearer {METRICS_TOKEN}", f"Bearer {METRICS_TOKEN}x", "")
        ]
        status = await applied(database, hook["id"])
    evidence.logs(every_logger_at_debug)

    assert created["data"]["createCheckoutSession"]["url"].startswith(f"{stripe_url}/sandbox/checkout/")
    assert confirmed["data"]["confirmCheckoutSession"] == {"status": "TRIALING", "tier": "STARTER"}
    assert portal.status_code == 200 and "errors" not in portal.json()
    assert service.json() == {"data": {"userSubscription": {"tier": "STARTER"}}}
    assert [error_codes(r.json()) for r in refused_tokens] == [["UNAUTHENTICATED"], ["UNAUTHENTICATED"]]
    assert accepted.status_code == 200 and status == "processed"
    assert [r.status_code for r in bad] == [400, 400, 400, 400]
    assert any("rejected a webhook" in text for text in evidence.texts)
    assert [r.status_code for r in scraped] == [200, 401, 401]
    evidence.check()


async def applied(database: Database, event_id: str) -> str:
    """Wait until the webhook worker has applied the event (it calls Stripe with the key)."""
    for _ in range(200):
        async with database.read() as conn:
            status = (
                await conn.execute(select(event_table.c.status).where(event_table.c.id == event_id))
            ).scalar_one_or_none()
        if status not in (None, "pending", "processing"):
            return str(status)
        await asyncio.sleep(0.05)
    raise AssertionError(f"event {event_id} was not applied")


@strawberry.type
class Faulty:
    @strawberry.field
    async def explode(self, info: strawberry.Info[Any, Any]) -> str:
        """An unexpected failure while talking to Stripe with the configured key."""
        settings = context_of(info).services.settings
        gateway = StripeGateway(
            GatewayConfig(
                api_key=settings.stripe_secret_key.get_secret_value(),  # type: ignore[union-attr]
                api_base=f"http://127.0.0.1:{free_port()}",
                max_network_retries=0,
            )
        )
        try:
            await gateway.v1.customers.retrieve_async("cus_missing")  # not through gateway.call: unmapped
        finally:
            await gateway.close()
        return "unreachable"


FAULTY_SCHEMA = build_schema(merge_types("Query", (BillingQuery, Faulty)))


async def test_a_masked_internal_error_shows_no_secret(
    database: Database, every_logger_at_debug: pytest.LogCaptureFixture
) -> None:
    evidence = Evidence()
    async with serve_api(database, schema=FAULTY_SCHEMA, **secret_settings()) as api:
        response = evidence.response(
            await api.post("{ explode }", headers={"Authorization": f"Bearer {SERVICE_KEY}"})
        )
    evidence.logs(every_logger_at_debug)
    error = response.json()["errors"][0]
    assert error["message"] == "Internal server error" and error["extensions"]["code"] == "INTERNAL_ERROR"
    assert any(error["extensions"]["requestId"] in text for text in evidence.texts)  # it was logged
    evidence.check()


async def test_an_unreachable_database_shows_no_secret(
    every_logger_at_debug: pytest.LogCaptureFixture,
) -> None:
    evidence = Evidence()
    url = f"postgresql+asyncpg://billing:{DB_PASSWORD}@127.0.0.1:{free_port()}/billing"
    unreachable = Database.from_url(url)
    try:
        async with serve_api(unreachable, **secret_settings()) as api, httpx.AsyncClient() as client:
            ready = evidence.response(await client.get(f"{api.url}/readyz"))
            viewer = evidence.response(
                await api.post("{ viewer { subscription { tier } } }", token=hs256_token(secret=JWT_SECRET))
            )
            service = evidence.response(
                await api.post(
                    '{ userSubscription(userId: "u") { tier } }',
                    headers={"Authorization": f"Bearer {SERVICE_KEY}"},
                )
            )
    finally:
        await unreachable.dispose()
    evidence.logs(every_logger_at_debug)
    assert ready.status_code == 503 and ready.json()["status"] == "unavailable"
    assert "check DATABASE_URL" in ready.json()["reason"]
    assert error_codes(viewer.json()) == ["INTERNAL_ERROR"]
    assert error_codes(service.json()) == ["INTERNAL_ERROR"]
    evidence.check()


# The command line ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["sync"], {"STRIPE_API_BASE": "closed"}, "BILLING_PROVIDER_UNAVAILABLE"),
        (["catalog", "sync", "--dry-run"], {"STRIPE_API_BASE": "closed"}, "BILLING_PROVIDER_UNAVAILABLE"),
        (["migrate"], {"DATABASE_URL": "unreachable"}, "check DATABASE_URL"),
        (["serve", "--port", "1"], {"DATABASE_URL": "unreachable"}, "check DATABASE_URL"),
        (["events", "replay", "--failed"], {"DATABASE_URL": "unreachable"}, "error:"),
        (["token", "someone"], {"ENVIRONMENT": "production"}, "error:"),
        (["sync"], {"ENVIRONMENT": "production", "SERVICE_API_KEY": "changeme"}, "SERVICE_API_KEY"),
    ],
)
def test_cli_errors_show_no_secret(
    args: list[str],
    env: dict[str, str],
    expected: str,
    every_logger_at_debug: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Any,
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env
    values = {
        **secret_env(),
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/billing.db",
        "LOG_LEVEL": "DEBUG",
        **env,
    }
    if values.get("STRIPE_API_BASE") == "closed":
        values["STRIPE_API_BASE"] = f"http://127.0.0.1:{free_port()}"
    if values.get("DATABASE_URL") == "unreachable":
        values["DATABASE_URL"] = f"postgresql://billing:{DB_PASSWORD}@127.0.0.1:{free_port()}/billing"
    else:
        upgrade(values["DATABASE_URL"])
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(main, args)
    evidence = Evidence()
    evidence.texts.append(result.output)
    evidence.texts.append(
        repr(result.exception) if result.exception and not isinstance(result.exception, SystemExit) else ""
    )
    evidence.logs(every_logger_at_debug)
    assert result.exit_code == 1, result.output
    assert expected in result.output
    evidence.check()
