"""Helpers for the GraphQL tests: a served app, real tokens, account rows.

The app is `graph.app.create_app` served by uvicorn on a loopback port and reached with httpx,
exactly as a frontend reaches it. Tokens are signed here with PyJWT, independently of the code
under test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt
from sqlalchemy import insert

from billing.settings import DEV_JWT_SECRET, Settings
from db.engine import Database
from db.models import account_table
from tests.conftest import free_port, serve

SERVICE_KEY = "svc_" + "k" * 40
PRODUCTION_SECRET = "a-production-grade-secret-of-40-characters"
# The settings of a served app in production (`serve_api(database, **PRODUCTION)`).
PRODUCTION = {
    "environment": "production",
    "stripe_webhook_secret": "whsec_production_like_secret",
    "auth_jwt_secret": PRODUCTION_SECRET,
    "metrics_token": "a-metrics-token-for-the-scraper-of-40-chars",
}


# Tests write accounts straight into the database and read them back through the service at
# once; with the account cache a read could then race the write's notification (the cache's
# documented bound). Its own tests (test_account_cache.py) turn it on and prove that bound.
NO_ACCOUNT_CACHE: dict[str, Any] = {"account_cache_seconds": 0}


def settings_for(url: str, **overrides: Any) -> Settings:
    """Settings of a served test app: a (never called) Stripe key, so no sandbox is started, and
    no account cache (see `NO_ACCOUNT_CACHE`)."""
    values: dict[str, Any] = {
        "public_base_url": url,
        "app_url": "http://app.test",
        "stripe_secret_key": "sk_test_graphql_tests",
        "webhook_worker": False,
        **NO_ACCOUNT_CACHE,
        **overrides,
    }
    return Settings(**values)


@dataclass
class Api:
    url: str
    app: Any

    @property
    def endpoint(self) -> str:
        return f"{self.url}/graphql"

    async def post(
        self,
        query: str,
        variables: dict[str, Any] | None = None,
        *,
        token: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        body: dict[str, Any] = {"query": query}
        if variables is not None:
            body["variables"] = variables
        async with httpx.AsyncClient(timeout=10) as client:
            return await client.post(self.endpoint, json=body, headers=sent)

    async def query(
        self,
        query: str,
        variables: dict[str, Any] | None = None,
        *,
        token: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        response = await self.post(query, variables, token=token, headers=headers)
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result


@asynccontextmanager
async def serve_api(database: Database, *, schema: Any = None, **settings: Any) -> AsyncIterator[Api]:
    from graph.app import create_app

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    app = create_app(settings_for(url, **settings), database=database, schema=schema)
    async with serve(app, port):
        yield Api(url=url, app=app)


def hs256_token(
    sub: str | None = "user-1",
    *,
    secret: str = DEV_JWT_SECRET,
    ttl: timedelta = timedelta(minutes=10),
    headers: dict[str, Any] | None = None,
    **claims: Any,
) -> str:
    now = datetime.now(UTC)
    payload: dict[str, Any] = {"iat": now, "exp": now + ttl, **claims}
    if sub is not None:
        payload["sub"] = sub
    return jwt.encode(payload, secret, algorithm="HS256", headers=headers)


def error_codes(result: dict[str, Any]) -> list[str]:
    return [error.get("extensions", {}).get("code") for error in result.get("errors", [])]


def only_error(result: dict[str, Any]) -> dict[str, Any]:
    errors = result.get("errors") or []
    assert len(errors) == 1, result
    error: dict[str, Any] = errors[0]
    return error


async def insert_account(
    database: Database,
    user_id: str,
    *,
    status: str = "active",
    tier: str = "pro",
    interval: str | None = "monthly",
    period_start: datetime | None = None,
    **fields: Any,
) -> None:
    """A `billing_account` row as the webhook sync would leave it."""
    now = datetime.now(UTC)
    start = period_start if period_start is not None else now - timedelta(days=3)
    values: dict[str, Any] = {
        "user_id": user_id,
        "email": f"{user_id}@example.test",
        "name": None,
        "stripe_customer_id": f"cus_{user_id}",
        "stripe_subscription_id": None if status == "none" else f"sub_{user_id}",
        "stripe_price_id": None if status == "none" else f"price_{tier}_{interval}",
        "tier": tier,
        "interval": interval,
        "status": status,
        "current_period_start": None if status == "none" else start,
        "current_period_end": None if status == "none" else start + timedelta(days=30),
        "cancel_at_period_end": False,
        "trial_used": status == "trialing",
        "synced_at": now,
        "created_at": now,
        "updated_at": now,
        **fields,
    }
    async with database.write() as conn:
        await conn.execute(insert(account_table).values(**values))
