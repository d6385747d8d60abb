"""The FastAPI application factory: GraphQL at /graphql, health probes, the Stripe sandbox."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Coroutine
from contextlib import AbstractContextManager, asynccontextmanager, nullcontext
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from strawberry.schema import BaseSchema

from billing.account_cache import account_cache
from billing.catalog import sync_catalog
from billing.errors import BillingError, ErrorCode
from billing.host_events.config import delivery_config, host_event_config
from billing.host_events.delivery import HostEventDelivery
from billing.logs import REQUEST_ID, request_id_for
from billing.metrics import DatabaseGauges
from billing.notifier import LogNotifier, Notifier
from billing.plans import Catalog, load_catalog
from billing.realtime import Realtime
from billing.settings import Settings, load_settings
from billing.stripe_gateway import GatewayConfig, StripeGateway
from billing.usage.reporting import UsageReporter
from billing.webhooks import WEBHOOK_PATH, EventProcessor
from db.engine import Database
from db.health import DatabaseNotReady, ensure_ready
from graph.admin import install_admin
from graph.context import GraphQLServices
from graph.metrics import metrics_endpoint, worker_exited
from graph.rest_docs import install_front_door
from graph.schema import schema as billing_schema
from graph.security import protect_graphql
from graph.tracing import tracing_requested
from graph.view import BillingGraphQL
from graph.webhooks import stripe_webhook

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

    from stripe_sandbox.api import SandboxConfig
    from stripe_sandbox.app import Sandbox

log = logging.getLogger("billing.app")


def sandbox_config(settings: Settings) -> SandboxConfig:
    from stripe_sandbox.api import SandboxConfig

    url, schema_name = settings.sandbox_database()
    return SandboxConfig(
        database_url=url,
        schema=schema_name,
        public_base_url=settings.service_url,
        webhook_secret=settings.webhook_secrets[0],
        dunning_final_action=settings.sandbox_dunning_final_action,
    )


GRAPHQL_PATH = "/graphql"
GRAPHQL_METHODS = frozenset({"GET", "POST", "OPTIONS"})
METRICS_PATH = "/metrics"


class BillingApp(FastAPI):
    """FastAPI, except that /graphql and the webhook route are answered before FastAPI's
    middleware stack and router.

    Every request FastAPI serves goes through its middleware stack (server errors, exception
    handlers, body limit, telemetry, an exit stack for dependencies) and then the routes in
    order. None of it serves GraphQL (Strawberry answers its own errors) or the webhook route
    (it answers its own 4xx/5xx), and for a small request it is a tenth of the CPU or more
    (bench/RESULTS.md). So those two go straight to their endpoints, as long as no middleware
    was added to the app: a host app that adds its own still sees them through it (the routes
    below stay as the way in).
    """

    graphql_http: ASGIApp | None = None
    graphql_websocket: ASGIApp | None = None
    stripe_webhook: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            # Every request's log lines carry its id: the caller's X-Request-ID when well-formed,
            # else a new one, sent back on the HTTP response (billing/logs.py).
            request_id = request_id_for(_header(scope, b"x-request-id"))
            REQUEST_ID.set(request_id)  # each request runs in a task (a context) of its own
            if scope["type"] == "http":
                send = _with_request_id(send, request_id.encode())
        await self._dispatch(scope, receive, send)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path")
        if path in (GRAPHQL_PATH, WEBHOOK_PATH) and not self.user_middleware:
            endpoint = None
            if path == WEBHOOK_PATH:
                if scope["type"] == "http" and scope["method"] == "POST":
                    endpoint = self.stripe_webhook
            elif scope["type"] == "http" and scope["method"] in GRAPHQL_METHODS:
                endpoint = self.graphql_http
            elif scope["type"] == "websocket":
                endpoint = self.graphql_websocket
            if endpoint is not None:
                scope["app"] = self
                await endpoint(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _with_request_id(send: Send, request_id: bytes) -> Send:
    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id)]
        await send(message)

    return sending


def create_app(
    settings: Settings | None = None,
    *,
    database: Database | None = None,
    sandbox: SandboxConfig | None = None,
    notifier: Notifier | None = None,
    schema: BaseSchema | None = None,
    tracer_provider: TracerProvider | None = None,
) -> BillingApp:
    """Build the app.

    Tests pass their own `database` (the caller then owns and disposes it; its fast reads follow
    `FAST_PATHS`, as the app's own do) and `sandbox` configuration; host apps pass a `notifier`
    to send emails, and may pass their own `schema` (built with `graph.schema.build_schema`,
    merging the billing `Query` with theirs) to serve it at /graphql instead of the billing one.
    In sandbox mode (no `STRIPE_SECRET_KEY`) the Stripe sandbox is mounted at `/sandbox` and the
    SDK points at it; `stripe_sandbox` is imported only then, so a production process never
    loads the emulator.
    """
    settings = settings or load_settings()
    catalog = load_catalog(settings.billing_plans_file)
    if tracer_provider is None and tracing_requested():
        from graph.tracing import default_provider

        tracer_provider = default_provider()
    sandbox_app: Sandbox | None = None
    if settings.sandbox_mode:
        from stripe_sandbox.app import Sandbox

        sandbox_app = Sandbox(sandbox or sandbox_config(settings))
    background: set[asyncio.Task[None]] = set()

    def start_background(job: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(job)
        background.add(task)
        task.add_done_callback(background.discard)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = database is None
        app.state.database = database or Database.from_url(settings.database_url)
        # Traced: every statement through SQLAlchemy, so its instrumentation records each once.
        app.state.database.use_fast_reads(settings.fast_paths and tracer_provider is None)
        graphql_services.database = app.state.database
        app.state.metrics_gauges = DatabaseGauges(app.state.database)
        graphql_services.accounts = account_cache(app.state.database, settings)
        app.state.realtime = Realtime.for_database(
            app.state.database, graphql_services.policy, cache=graphql_services.accounts
        )
        await app.state.realtime.start()
        graphql_services.realtime = app.state.realtime.hub
        app.state.stripe = StripeGateway(GatewayConfig.from_settings(settings))
        graphql_services.gateway = app.state.stripe
        # Events for the host app (HOST_WEBHOOK_URL): written with every sync, delivered here.
        app.state.host_delivery = None
        host_events = host_event_config(settings)
        delivery = delivery_config(settings)
        if delivery is not None:
            app.state.host_delivery = HostEventDelivery(database=app.state.database, config=delivery)
            host_events = host_event_config(settings, kick=app.state.host_delivery.kick)
            if settings.host_events_worker:
                start_background(app.state.host_delivery.run())
        app.state.host_events = host_events
        app.state.events = EventProcessor(
            database=app.state.database,
            gateway=app.state.stripe,
            notifier=notifier or LogNotifier(),
            host_events=host_events,
        )
        graphql_services.locks = app.state.events.locks
        if settings.webhook_worker:
            start_background(app.state.events.run())
        app.state.usage_reporter = UsageReporter(
            database=app.state.database, gateway=app.state.stripe, catalog=catalog
        )
        graphql_services.reporter = app.state.usage_reporter
        if settings.usage_reporter:
            start_background(app.state.usage_reporter.run())
        app.state.catalog_synced = asyncio.Event()
        if sandbox_app is not None:
            await sandbox_app.start()
            if settings.sandbox_sync_catalog:
                # Over HTTP like any Stripe call, so it must wait until the server listens.
                start_background(_sync_sandbox_catalog(app, catalog, settings))
        try:
            with _traced(app.state.database, tracer_provider):
                yield
        finally:
            for task in list(background):
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await app.state.realtime.stop()
            if sandbox_app is not None:
                await sandbox_app.stop()
            await app.state.stripe.close()
            if app.state.host_delivery is not None:
                await app.state.host_delivery.close()
            if owned:
                await app.state.database.dispose()
            worker_exited()

    app = BillingApp(
        title="Billing API",
        lifespan=lifespan,
        docs_url=None,  # the self-hosted Swagger UI instead (graph.rest_docs, graph.front_door)
        redoc_url=None,
        openapi_url="/openapi.json" if settings.docs_enabled else None,
    )
    app.state.settings = settings
    app.state.catalog = catalog
    app.state.sandbox = sandbox_app
    graphql_services = GraphQLServices.create(settings, catalog)
    app.state.graphql = graphql_services

    @app.get("/healthz", tags=["health"], summary="Liveness: the process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["health"],
        summary="Readiness: the database answers and is migrated",
        responses={
            200: {"description": 'Ready: `{"status": "ready"}`.'},
            503: {"description": 'Not ready: `{"status": "unavailable", "reason": ...}`.'},
        },
    )
    async def readyz() -> JSONResponse:
        try:
            await ensure_ready(app.state.database.engine)
        except DatabaseNotReady as exc:
            return JSONResponse({"status": "unavailable", "reason": str(exc)}, status_code=503)
        return JSONResponse({"status": "ready"})

    if settings.metrics_enabled:  # Prometheus, with METRICS_TOKEN as a bearer token (graph/metrics.py)
        app.router.routes.append(Route(METRICS_PATH, metrics_endpoint, methods=["GET"]))

    if tracer_provider is not None:  # graph/tracing.py
        from graph.tracing import instrument_app, traced_schema

        schema = schema or traced_schema(tracer_provider)
        instrument_app(app, tracer_provider)
    graphql_app = BillingGraphQL(schema or billing_schema, graphql_services)
    # Strawberry's own ASGI app, routed directly: FastAPI's GraphQLRouter adds dependency
    # injection per request, which costs about half the throughput (shared performance notes).
    # Body size, content type, no batches, CORS (graph.security); OPTIONS for CORS preflights.
    guarded = protect_graphql(graphql_app, settings)
    if tracer_provider is None:  # traced, every request goes through FastAPI's middleware
        app.graphql_http, app.graphql_websocket = guarded, graphql_app
    app.router.routes.append(Route(GRAPHQL_PATH, guarded, methods=sorted(GRAPHQL_METHODS)))
    app.router.routes.append(WebSocketRoute(GRAPHQL_PATH, graphql_app))
    webhook_route = Route(WEBHOOK_PATH, stripe_webhook, methods=["POST"])
    if tracer_provider is None:
        app.stripe_webhook = webhook_route.app
    app.router.routes.append(webhook_route)
    if sandbox_app is not None:
        app.router.routes.append(Mount("/sandbox", app=sandbox_app))
    install_front_door(app, settings, None if sandbox_app is None else sandbox_app.control_routes())
    install_admin(app, settings)  # /admin (graph/admin/)
    return app


def _traced(database: Database, provider: TracerProvider | None) -> AbstractContextManager[object]:
    if provider is None:
        return nullcontext()
    from graph.tracing import tracing_engine

    return tracing_engine(database.engine, provider)


async def _sync_sandbox_catalog(app: FastAPI, catalog: Catalog, settings: Settings) -> None:
    """Sandbox mode: make the sandbox match the plans file, so the first checkout works."""
    for _attempt in range(40):
        try:
            report = await sync_catalog(
                catalog=catalog, gateway=app.state.stripe, return_url=f"{settings.app_url}/billing"
            )
        except BillingError as exc:
            if exc.code is not ErrorCode.BILLING_PROVIDER_UNAVAILABLE:
                log.error("sandbox catalog sync failed: %s", exc.message)
                return
            await asyncio.sleep(0.25)  # the server is not listening yet
            continue
        log.info("sandbox catalog synced (%d changes)", len(report.changes))
        app.state.catalog_synced.set()
        return
    log.error("sandbox catalog sync gave up: the sandbox never answered")
