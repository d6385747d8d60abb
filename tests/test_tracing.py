"""Traces (the `otel` extra), with the SDK's in-memory exporter: one checkout request is one trace
with the HTTP, GraphQL, database and Stripe spans in parent order, and a webhook's apply span is
the child of its ingest span. Without the OTEL_* settings the app holds no tracing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import httpx
import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from billing import tracing as billing_tracing
from db.engine import Database
from graph.tracing import tracing_requested
from tests.billing_flows import setup_catalog
from tests.checkout_flows import create_checkout, token
from tests.conftest import DbTarget, Service, free_port, serve, service_settings
from tests.gateways import sandbox_gateway
from tests.stripe_events import event, post_event


@asynccontextmanager
async def traced_service(
    database: Database, sandbox_db: DbTarget, provider: TracerProvider, **overrides: Any
) -> AsyncIterator[Service]:
    from graph.app import create_app, sandbox_config

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    settings = service_settings(url, **overrides)
    config = replace(sandbox_config(settings), database_url=sandbox_db.url, schema=sandbox_db.schema)
    app = create_app(settings, database=database, sandbox=config, tracer_provider=provider)
    async with serve(app, port):
        yield Service(url=url, app=app, database=database, sandbox_db=sandbox_db)


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def ancestors(span: ReadableSpan, by_id: dict[int, ReadableSpan]) -> list[str]:
    """The names of the span's ancestors, nearest first."""
    names = []
    parent = span.parent
    while parent is not None and parent.span_id in by_id:
        above = by_id[parent.span_id]
        names.append(above.name)
        parent = above.parent
    return names


def test_tracing_is_requested_only_by_the_otel_settings() -> None:
    assert not tracing_requested({})
    assert tracing_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert tracing_requested({"OTEL_TRACES_EXPORTER": "otlp"})
    assert not tracing_requested({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"})


async def test_a_checkout_is_one_trace_http_graphql_database_stripe(
    database: Database, sandbox_db: DbTarget, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    async with traced_service(database, sandbox_db, provider, webhook_worker=False) as service:
        gateway = sandbox_gateway(service.url)
        try:
            await setup_catalog(gateway)
        finally:
            await gateway.close()
        exporter.clear()
        await create_checkout(service, token("ada"))
    spans = exporter.get_finished_spans()
    (http,) = [s for s in spans if s.name == "POST /graphql" and s.parent is None]
    trace = [s for s in spans if s.context.trace_id == http.context.trace_id]
    by_id = {s.context.span_id: s for s in trace}
    (operation,) = [s for s in trace if s.name.startswith("GraphQL Query")]
    (resolver,) = [s for s in trace if s.name == "GraphQL Resolving: createCheckoutSession"]
    stripe_calls = [s for s in trace if s.name.startswith("stripe ")]
    statements = [s for s in trace if s.attributes and "db.statement" in s.attributes]
    assert ancestors(operation, by_id) == ["POST /graphql"]
    assert ancestors(resolver, by_id)[-2:] == [operation.name, "POST /graphql"]
    assert "stripe create_checkout_session" in {s.name for s in stripe_calls}
    for span in [*stripe_calls, *statements]:
        assert ancestors(span, by_id)[-3:] == [resolver.name, operation.name, "POST /graphql"], span.name
    assert statements, "; ".join(f"{s.name} {sorted(s.attributes or {})}" for s in spans)
    # Argument values (emails, names) stay out of the trace.
    assert not any(key.startswith("graphql.param.") for s in trace for key in (s.attributes or {}))


async def test_a_webhooks_apply_span_is_the_child_of_its_ingest_span(
    database: Database, sandbox_db: DbTarget, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    async with traced_service(database, sandbox_db, provider, webhook_worker=False) as service:
        hook = event("customer.updated", {"id": "cus_traced", "object": "customer"})
        async with httpx.AsyncClient() as client:
            assert (await post_event(client, service.url, hook)).status_code == 200
        await service.app.state.events.drain()
    spans = exporter.get_finished_spans()
    (ingest,) = [s for s in spans if s.name == "webhook ingest"]
    (apply,) = [s for s in spans if s.name == "webhook apply"]
    assert ingest.parent is not None and ingest.parent.span_id in {s.context.span_id for s in spans}
    assert apply.parent is not None and apply.parent.span_id == ingest.context.span_id
    assert apply.context.trace_id == ingest.context.trace_id
    assert apply.attributes is not None and apply.attributes["stripe.event_ids"] == hook["id"]
    assert billing_tracing.SPANS is None  # off again once the app stopped


async def test_without_the_settings_no_span_is_made(database: Database, sandbox_db: DbTarget) -> None:
    from tests.conftest import running_service

    async with running_service(database, sandbox_db) as service:
        assert billing_tracing.SPANS is None and service.app.graphql_http is not None
        assert billing_tracing.traceparent() is None
