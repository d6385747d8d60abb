"""The host app's ASGI app: the billing service's app factory serving the merged schema."""

from __future__ import annotations

from fastapi import FastAPI

from billing.settings import Settings
from db.engine import Database
from examples.host_app.schema import schema
from graph.app import create_app


def create_host_app(settings: Settings | None = None, *, database: Database | None = None) -> FastAPI:
    """GraphQL at /graphql with billing's fields (`plans`, `viewer`, `access`) and the host's."""
    return create_app(settings, database=database, schema=schema)
