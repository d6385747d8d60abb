"""GET /metrics: real scrapes of a running service (both databases), read with prometheus-client's
parser and checked with `promtool check metrics`; the bearer token; `--workers 2` in one scrape."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import insert, update

from billing.stripe_gateway import StripeGateway
from billing.webhooks import MAX_ATTEMPTS
from db.engine import Database
from db.migrate import upgrade
from db.models import HostEventStatus, event_table, host_endpoint_table, host_event_table
from tests.billing_flows import control, eventually, setup_catalog
from tests.checkout_flows import subscribe_via_api
from tests.conftest import DbTarget, Service, free_port, running_service
from tests.graphql_support import SERVICE_KEY, hs256_token, insert_account
from tests.processes import BILLING, assert_one_clear_line, run, wait_ready
from tests.promtool import promtool
from tests.stripe_events import event, post_event
from tests.stripe_faults import clear_faults, inject

TOKEN = "metrics-scraper-token-" + "m" * 30
OPERATIONS_DOC = Path(__file__).resolve().parents[1] / "docs" / "operations.md"
RECORD = """mutation($input: RecordUsageInput!) { recordUsage(input: $input) { id duplicate } }"""

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(url: str, token: str | None = TOKEN) -> str:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.get(f"{url}/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return response.text


@pytest.fixture
async def observed(database: Database, sandbox_db: DbTarget) -> AsyncIterator[Service]:
    """The service with a metrics token, no background worker or reporter (the test drains), and
    the database gauges read on every scrape."""
    async with running_service(
        database,
        sandbox_db,
        webhook_worker=False,
        usage_reporter=False,
        service_api_key=SERVICE_KEY,
        metrics_token=TOKEN,
    ) as service:
        service.app.state.metrics_gauges.cache_seconds = 0
        yield service


async def gateway_of(service: Service) -> StripeGateway:
    gateway: StripeGateway = service.app.state.stripe
    return gateway


async def drain_deliveries(service: Service) -> None:
    await control(service, "delivery/flush", {"timeout": 20})
    await service.app.state.events.drain()


async def test_metrics_need_the_bearer_token_when_one_is_set(observed: Service) -> None:
    async with httpx.AsyncClient() as client:
        missing = await client.get(f"{observed.url}/metrics")
        wrong = await client.get(f"{observed.url}/metrics", headers={"Authorization": "Bearer nope"})
        basic = await client.get(f"{observed.url}/metrics", headers={"Authorization": f"Basic {TOKEN}"})
    for answer in (missing, wrong, basic):
        assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer"
        assert "billing_" not in answer.text
    assert "billing_ready 1.0" in await scrape(observed.url)


async def test_metrics_can_be_turned_off(database: Database, sandbox_db: DbTarget) -> None:
    async with (
        running_service(database, sandbox_db, metrics_enabled=False) as service,
        httpx.AsyncClient() as client,
    ):
        assert (await client.get(f"{service.url}/metrics")).status_code == 404


async def test_a_scrape_passes_promtool_check_metrics(observed: Service) -> None:
    async with httpx.AsyncClient() as client:  # a labelled child of each family, so each has a sample
        await client.post(f"{observed.url}/graphql", json={"query": "{ plans { id } }"})
    text = await scrape(observed.url)
    promtool("check", "metrics", stdin=text.encode())
    for name in (
        "billing_ready",
        "billing_graphql_requests_total",
        "billing_graphql_request_duration_seconds_bucket",
        "billing_webhook_inbox_pending",
        "billing_webhook_inbox_oldest_pending_age_seconds",
        "billing_usage_oldest_unreported_age_seconds",
        "billing_realtime_connections",
        "billing_usage_records_total",
        "process_cpu_seconds_total",  # one process: the default process metrics are there
    ):
        assert f"\n{name}" in text, name
    documented = OPERATIONS_DOC.read_text()
    for family in text_string_to_metric_families(text):
        if family.name.startswith("billing_") and not family.name.endswith("_created"):
            name = family.name + ("_total" if family.type == "counter" else "")
            assert f"`{name}`" in documented, f"{name} is not in docs/operations.md"


async def test_counters_and_gauges_move_by_exactly_what_happened(observed: Service) -> None:
    service = observed
    gateway = await gateway_of(service)
    await setup_catalog(gateway)
    before = parse(await scrape(service.url))

    # A checkout through the API, and the webhooks it causes applied.
    user = hs256_token("ada", email="ada@example.test")
    await subscribe_via_api(service, user)
    await drain_deliveries(service)
    after_checkout = parse(await scrape(service.url))
    for field in ("createCheckoutSession", "confirmCheckoutSession"):
        labels = {"operation_type": "mutation", "root_field": field, "outcome": "ok"}
        moved = value(after_checkout, "billing_graphql_requests_total", **labels) - value(
            before, "billing_graphql_requests_total", **labels
        )
        assert moved == 1, field
    created = {"operation": "create_checkout_session", "outcome": "ok"}
    assert (
        value(after_checkout, "billing_stripe_requests_total", **created)
        - value(before, "billing_stripe_requests_total", **created)
        == 1
    )
    assert value(after_checkout, "billing_subscriptions", status="trialing", tier="starter") == 1
    assert value(after_checkout, "billing_webhook_inbox_pending") == 0
    assert value(after_checkout, "billing_ready") == 1

    # Webhooks: one new, the same again, one with a bad signature; its apply fails, then for good.
    customer = {"id": "cus_metrics", "object": "customer"}
    evt = event("customer.updated", customer)
    async with httpx.AsyncClient() as client:
        assert (await post_event(client, service.url, evt)).json() == {"received": True, "duplicate": False}
        assert (await post_event(client, service.url, evt)).json() == {"received": True, "duplicate": True}
        assert (await post_event(client, service.url, evt, secret="whsec_wrong")).status_code == 400
    pending = parse(await scrape(service.url))
    assert value(pending, "billing_webhook_inbox_pending") == 1
    await inject(service, path_prefix="/v1/customers/cus_metrics", status=500, count=20)
    await service.app.state.events.drain()  # Stripe answers 500: retried later
    async with service.database.write() as conn:  # its last attempt, due now
        await conn.execute(
            update(event_table)
            .where(event_table.c.id == evt["id"])
            .values(attempts=MAX_ATTEMPTS, next_attempt_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    await service.app.state.events.drain()  # failed for good
    await clear_faults(service)

    # Stripe answers 429 once: the gateway retries and the call succeeds.
    await inject(service, path_prefix="/v1/customers", status=429, count=1)
    await gateway.call(lambda o: gateway.v1.customers.list_async({"limit": 1}, o), what="list customers")

    # Usage: one record, the same key again (a replay, not a new record), one malformed query.
    await insert_account(service.database, "member", tier="pro")
    recorded_at = (datetime.now(UTC) - timedelta(hours=2)).isoformat()
    usage = {
        "userId": "member",
        "feature": "api_calls",
        "quantity": 3,
        "idempotencyKey": "m-1",
        "recordedAt": recorded_at,
    }
    async with httpx.AsyncClient() as client:
        for _ in range(2):
            answer = await client.post(
                f"{service.url}/graphql",
                json={"query": RECORD, "variables": {"input": usage}},
                headers={"Authorization": f"Bearer {SERVICE_KEY}"},
            )
            assert "errors" not in answer.json(), answer.text
        await client.post(f"{service.url}/graphql", json={"query": "{ plans { id "})
        await client.post(f"{service.url}/graphql", json={"query": "{ noSuchField }"})

    after = parse(await scrape(service.url))

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(after_checkout, name, **labels)

    assert moved("billing_webhook_events_received_total", outcome="new") == 1
    assert moved("billing_webhook_events_received_total", outcome="duplicate") == 1
    assert moved("billing_webhook_events_received_total", outcome="rejected") == 1
    assert (
        moved("billing_webhook_events_applied_total", event_type="customer.updated", outcome="retried") == 1
    )
    assert moved("billing_webhook_events_applied_total", event_type="customer.updated", outcome="failed") == 1
    assert moved("billing_stripe_requests_total", operation="retrieve_customer", outcome="unavailable") == 2
    assert moved("billing_stripe_retries_total", reason="rate_limited") == 1
    assert moved("billing_stripe_requests_total", operation="list_customers", outcome="ok") == 1
    assert moved("billing_usage_records_total") == 1
    ok_usage = {"operation_type": "mutation", "root_field": "recordUsage", "outcome": "ok"}
    assert moved("billing_graphql_requests_total", **ok_usage) == 2
    parse_failed = {"operation_type": "none", "root_field": "none", "outcome": "GRAPHQL_PARSE_FAILED"}
    assert moved("billing_graphql_requests_total", **parse_failed) == 1
    invalid = {"operation_type": "query", "root_field": "none", "outcome": "GRAPHQL_VALIDATION_FAILED"}
    assert moved("billing_graphql_requests_total", **invalid) == 1
    assert value(after, "billing_webhook_inbox_failed") == 1
    assert value(after, "billing_webhook_inbox_pending") == 0
    assert value(after, "billing_subscriptions", status="active", tier="pro") == 1
    assert value(after, "billing_usage_report_pending") == 0
    assert 7200 <= value(after, "billing_usage_oldest_unreported_age_seconds") < 7300
    assert moved("billing_graphql_request_duration_seconds_count", operation_type="mutation") == 2


@pytest.mark.postgres_only
def test_two_workers_answer_one_scrape_with_the_whole_service(fresh_pg_url: str, tmp_path: Path) -> None:
    upgrade(fresh_pg_url)
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "counter_1.db").write_bytes(b"left over from an earlier run")  # emptied at start
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "DATABASE_URL": fresh_pg_url,
        "PUBLIC_BASE_URL": url,
        "METRICS_TOKEN": TOKEN,
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "SANDBOX_SYNC_CATALOG": "false",
    }
    log = tmp_path / "serve.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [BILLING, "serve", "--port", str(port), "--workers", "2"],
            env=env,
            cwd=tmp_path,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_ready(url, process, log)
        asyncio.run(_served_by_both(url, metrics_dir))
    finally:
        process.terminate()
        process.wait(timeout=20)


async def _served_by_both(url: str, metrics_dir: Path) -> None:
    labels = {"operation_type": "query", "root_field": "plans", "outcome": "ok"}
    before = value(parse(await scrape(url)), "billing_graphql_requests_total", **labels)

    async def one() -> None:
        async with httpx.AsyncClient(timeout=30) as client:  # a new connection each: either worker
            answer = await client.post(f"{url}/graphql", json={"query": "{ plans { id } }"})
        assert answer.status_code == 200, answer.text

    def serving() -> set[str]:  # the workers that timed a GraphQL request have a histogram file
        return {name for name in os.listdir(metrics_dir) if name.startswith("histogram_")}

    requests = 0
    while len(serving()) < 2 and requests < 3000:  # the kernel picks the worker of each connection
        await asyncio.gather(*(one() for _ in range(20)))
        requests += 20
    assert len(serving()) == 2, f"one worker served {requests} requests: {sorted(os.listdir(metrics_dir))}"
    for _ in range(6):  # whichever worker answers the scrape shows every request
        text = await scrape(url)
        assert value(parse(text), "billing_graphql_requests_total", **labels) - before == requests
        assert "process_cpu_seconds_total" not in text  # absent in multiprocess mode (docs)
    promtool("check", "metrics", stdin=text.encode())


def test_production_refuses_to_serve_open_metrics_naming_metrics_token(tmp_path: Path) -> None:
    production = {
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'billing.db'}",
        "ENVIRONMENT": "production",
        "STRIPE_SECRET_KEY": "sk_test_production_like",
        "STRIPE_WEBHOOK_SECRET": "whsec_production_like_secret",
        "AUTH_JWT_SECRET": "a-production-grade-secret-of-40-characters",
    }
    refused = run("serve", env=production, cwd=tmp_path)
    assert_one_clear_line(refused, "METRICS_TOKEN")
    assert "STRIPE" not in refused.stderr and "AUTH_JWT_SECRET" not in refused.stderr  # only what is wrong


async def test_websockets_and_subscriptions_are_live_gauges(observed: Service) -> None:
    from tests.realtime_support import live_socket

    await insert_account(observed.database, "watcher", tier="pro")
    labels = {"operation_type": "subscription", "root_field": "billingStateChanged", "outcome": "ok"}
    before = parse(await scrape(observed.url))
    async with live_socket(observed.url, hs256_token("watcher")) as socket:
        await socket.subscribe()
        await socket.next_state()
        during = parse(await scrape(observed.url))

    async def closed() -> bool:  # the server notices the close a moment later
        after = parse(await scrape(observed.url))
        gauges = ("billing_realtime_connections", "billing_realtime_subscriptions")
        return all(value(after, gauge) == value(before, gauge) for gauge in gauges)

    await eventually(closed, what="the websocket's gauges back down", seconds=10)
    assert value(during, "billing_realtime_connections") == value(before, "billing_realtime_connections") + 1
    assert (
        value(during, "billing_realtime_subscriptions") == value(before, "billing_realtime_subscriptions") + 1
    )
    assert (
        value(during, "billing_graphql_requests_total", **labels)
        - value(before, "billing_graphql_requests_total", **labels)
        == 1
    )


def test_a_dead_workers_live_gauges_are_dropped_at_scrape_time(tmp_path: Path) -> None:
    from graph.metrics import mark_dead_workers

    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no process has now
    alive = os.getpid()
    for pid in (dead.pid, alive):
        (tmp_path / f"gauge_livesum_{pid}.db").write_bytes(b"")
        (tmp_path / f"counter_{pid}.db").write_bytes(b"")
    mark_dead_workers(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(
        [f"counter_{dead.pid}.db", f"counter_{alive}.db", f"gauge_livesum_{alive}.db"]
    )  # its counters stay: they never go back


async def test_the_host_event_gauges_count_the_outbox_and_a_disabled_endpoint(observed: Service) -> None:
    now = datetime.now(UTC)
    rows = [
        (HostEventStatus.PENDING, now - timedelta(seconds=90)),
        (HostEventStatus.SENDING, now - timedelta(seconds=30)),
        (HostEventStatus.FAILED, now - timedelta(days=4)),
        (HostEventStatus.DELIVERED, now - timedelta(days=9)),
    ]
    async with observed.database.write() as conn:  # before the service's first scrape: none cached
        await conn.execute(
            insert(host_event_table),
            [
                {
                    "message_id": f"msg_gauges_{n}",
                    "type": "subscription.updated",
                    "payload": {},
                    "created_at": created,
                    "status": status.value,
                    "attempts": 0,
                }
                for n, (status, created) in enumerate(rows)
            ],
        )
        await conn.execute(
            insert(host_endpoint_table).values(
                url="https://host.example/hooks", disabled_at=now, disabled_reason="410 Gone", updated_at=now
            )
        )
    after = parse(await scrape(observed.url))
    assert value(after, "billing_host_events_pending") == 2
    assert value(after, "billing_host_events_failed") == 1
    assert value(after, "billing_host_endpoint_disabled") == 1
    assert 90 <= value(after, "billing_host_events_oldest_pending_age_seconds") < 120
