"""OpenTelemetry traces, with the `otel` extra (`pip install 'graph-billing[otel]'`).

On when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) or
`OTEL_TRACES_EXPORTER` (other than `none`) is set, or when a test passes its own tracer provider
to `create_app`. Then:

- HTTP requests: the FastAPI instrumentation (the app no longer answers /graphql and the webhook
  route before FastAPI's middleware, so every request passes it);
- the GraphQL operation and its resolvers: Strawberry's `OpenTelemetryExtension` on a schema
  built with it (the lean executor then steps aside; argument values are not recorded);
- database statements: SQLAlchemy's instrumentation of the app's engine (the asyncpg fast reads
  are turned off, so every statement is recorded once, by SQLAlchemy);
- each Stripe call, the webhook ingest and the worker's apply: billing/tracing.py's spans. Stripe
  sends no trace context with its webhooks, so the ingest span's traceparent is kept on the inbox
  row and the apply span is its child.

Off, none of this is imported: the hot path holds no OpenTelemetry code.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any

from billing import tracing as billing_tracing

if TYPE_CHECKING:
    from fastapi import FastAPI
    from opentelemetry.trace import TracerProvider
    from sqlalchemy.ext.asyncio import AsyncEngine
    from strawberry.extensions import SchemaExtension
    from strawberry.schema import BaseSchema

SERVICE_NAME = "billing"
UNTRACED_URLS = "healthz,readyz,metrics"


def tracing_requested(environ: Mapping[str, str] = os.environ) -> bool:
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter != "none"
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def default_provider() -> TracerProvider:
    """An SDK provider exporting over OTLP/HTTP as the OTEL_* variables say."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = SdkTracerProvider(resource=Resource.create({"service.name": SERVICE_NAME}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


class OtelSpans:
    """billing/tracing.py's spans, as OpenTelemetry spans of `provider`."""

    def __init__(self, provider: TracerProvider) -> None:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.tracer = provider.get_tracer("billing")
        self.propagator = TraceContextTextMapPropagator()

    def span(
        self, name: str, *, parent: str | None = None, attributes: Mapping[str, str] | None = None
    ) -> AbstractContextManager[object]:
        context = self.propagator.extract({"traceparent": parent}) if parent else None
        return self.tracer.start_as_current_span(name, context=context, attributes=attributes)

    def traceparent(self) -> str | None:
        carrier: dict[str, str] = {}
        self.propagator.inject(carrier)
        return carrier.get("traceparent")


def traced_schema(provider: TracerProvider) -> BaseSchema:
    """The billing schema with Strawberry's OpenTelemetry extension, reporting to `provider`."""
    from strawberry.extensions.tracing import OpenTelemetryExtension

    from graph.schema import Mutation, Query, Subscription, build_schema

    class Traced(OpenTelemetryExtension):
        def __init__(self, *, execution_context: Any = None) -> None:
            super().__init__(
                execution_context=execution_context, tracer_provider=provider, arg_filter=_no_arguments
            )

    extensions: list[type[SchemaExtension]] = [Traced]
    return build_schema(Query, mutation=Mutation, subscription=Subscription, extensions=extensions)


def _no_arguments(arguments: dict[str, Any], info: Any) -> dict[str, Any]:
    return {}  # argument values may be personal (emails, names): not in traces


def instrument_app(app: FastAPI, provider: TracerProvider) -> None:
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider, excluded_urls=UNTRACED_URLS)


@contextmanager
def tracing_engine(engine: AsyncEngine, provider: TracerProvider) -> Iterator[None]:
    """While the app runs: its statements traced, and billing's spans on."""
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

    instrumentor = SQLAlchemyInstrumentor()
    # It declares SQLAlchemy < 2.1 and would skip 2.1 silently; the cursor events it listens to
    # are unchanged in 2.1 (tests/test_tracing.py sees the statements).
    instrumentor.instrument(engine=engine.sync_engine, tracer_provider=provider, skip_dep_check=True)
    billing_tracing.SPANS = OtelSpans(provider)
    try:
        yield
    finally:
        billing_tracing.SPANS = None
        instrumentor.uninstrument()
