"""The baselines every scenario is compared with, served like the service (same uvicorn settings).

- B0 `GET /b0`: a bare Starlette JSON endpoint;
- B1 `GET /b1`: Starlette + one asyncpg `fetchrow` of a `billing_account` row by primary key;
- B2 `POST /b2`: Starlette + the HMAC-SHA256 check of a Stripe-signed event body (Stripe's scheme,
  as the service's webhook route) + one asyncpg `INSERT ... ON CONFLICT DO NOTHING`.

    BENCH_PG_DSN=postgresql://postgres@127.0.0.1/db BENCH_WEBHOOK_SECRET=whsec_... \
        uvicorn bench.baselines:app --loop uvloop --http httptools --no-access-log

B2 writes into `bench_b2_event` (created at start-up), not into the service's inbox.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

POOL_SIZE = 10  # the service's SQLAlchemy pool: 5 + 10 overflow


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    pool = await asyncpg.create_pool(os.environ["BENCH_PG_DSN"], min_size=POOL_SIZE, max_size=POOL_SIZE)
    async with pool.acquire() as conn:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS bench_b2_event "
            "(id text PRIMARY KEY, type text NOT NULL, received_at timestamptz NOT NULL, "
            "payload jsonb NOT NULL)"
        )
    app.state.pool = pool
    app.state.secret = os.environ["BENCH_WEBHOOK_SECRET"].encode()
    app.state.account_id = int(os.environ.get("BENCH_ACCOUNT_ID", "1"))
    try:
        yield
    finally:
        await pool.close()


async def b0(request: Request) -> Response:
    return JSONResponse({"ok": True})


async def b1(request: Request) -> Response:
    async with request.app.state.pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT id, status, tier FROM billing_account WHERE id = $1", request.app.state.account_id
        )
    return JSONResponse({"status": row["status"], "tier": row["tier"]})


def _valid(body: bytes, header: str, secret: bytes) -> bool:
    parts = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    expected = hmac.new(secret, parts.get("t", "").encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, parts.get("v1", ""))


async def b2(request: Request) -> Response:
    body = await request.body()
    if not _valid(body, request.headers.get("stripe-signature", ""), request.app.state.secret):
        return JSONResponse({"error": "invalid signature"}, status_code=400)
    event: dict[str, Any] = json.loads(body)
    async with request.app.state.pool.acquire() as conn:
        status = await conn.execute(
            "INSERT INTO bench_b2_event (id, type, received_at, payload) VALUES ($1, $2, now(), $3) "
            "ON CONFLICT DO NOTHING",
            event["id"],
            event["type"],
            body.decode(),
        )
    return JSONResponse({"received": True, "duplicate": status.endswith(" 0")})


app = Starlette(
    routes=[Route("/b0", b0), Route("/b1", b1), Route("/b2", b2, methods=["POST"])], lifespan=lifespan
)
