"""The FastAPI application factory: GraphQL at /graphql, health probes, the Stripe sandbox."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.routing import Mount, Route, WebSocketRoute
from strawberry.asgi import GraphQL

from billing.sandbox.api import SandboxConfig
from billing.sandbox.app import Sandbox
from billing.settings import Settings, load_settings
from billing.stripe_gateway import GatewayConfig, StripeGateway
from db.engine import Database
from db.health import DatabaseNotReady, ensure_ready
from graph.schema import schema

log = logging.getLogger("billing.app")


def sandbox_config(settings: Settings) -> SandboxConfig:
    url, schema_name = settings.sandbox_database()
    return SandboxConfig(
        database_url=url,
        schema=schema_name,
        public_base_url=settings.service_url,
        webhook_secret=settings.webhook_secrets[0],
        dunning_final_action=settings.sandbox_dunning_final_action,
    )


def create_app(
    settings: Settings | None = None,
    *,
    database: Database | None = None,
    sandbox: SandboxConfig | None = None,
) -> FastAPI:
    """Build the app.

    Tests pass their own `database` (the caller then owns and disposes it) and `sandbox`
    configuration. In sandbox mode (no `STRIPE_SECRET_KEY`) the Stripe sandbox is mounted at
    `/sandbox` and the SDK is pointed at it.
    """
    settings = settings or load_settings()
    sandbox_app = Sandbox(sandbox or sandbox_config(settings)) if settings.sandbox_mode else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = database is None
        app.state.database = database or Database.from_url(settings.database_url)
        app.state.stripe = StripeGateway(GatewayConfig.from_settings(settings))
        if sandbox_app is not None:
            await sandbox_app.start()
        try:
            yield
        finally:
            if sandbox_app is not None:
                await sandbox_app.stop()
            await app.state.stripe.close()
            if owned:
                await app.state.database.dispose()

    app = FastAPI(
        title="Billing API",
        lifespan=lifespan,
        docs_url=None if settings.is_production else "/docs",
        redoc_url=None,
        openapi_url=None if settings.is_production else "/openapi.json",
    )
    app.state.settings = settings
    app.state.sandbox = sandbox_app

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        try:
            await ensure_ready(app.state.database.engine)
        except DatabaseNotReady as exc:
            return JSONResponse({"status": "unavailable", "reason": str(exc)}, status_code=503)
        return JSONResponse({"status": "ready"})

    graphql_app = GraphQL(schema, graphql_ide=None if settings.is_production else "graphiql")
    # Strawberry's own ASGI app, routed directly: FastAPI's GraphQLRouter adds dependency
    # injection per request, which costs about half the throughput (shared performance notes).
    app.router.routes.append(Route("/graphql", graphql_app, methods=["GET", "POST"]))
    app.router.routes.append(WebSocketRoute("/graphql", graphql_app))
    if sandbox_app is not None:
        app.router.routes.append(Mount("/sandbox", app=sandbox_app))
    return app
