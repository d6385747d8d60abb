"""/healthz says the process is up; /readyz says whether the database can serve."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI

from billing.settings import Settings
from db.engine import Database
from graph.app import create_app
from tests.conftest import DbTarget


@asynccontextmanager
async def client_for(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


async def test_healthz_answers_without_touching_the_database() -> None:
    app = create_app(Settings(), database=Database.from_url("postgresql+asyncpg://x@127.0.0.1:1/none"))
    async with client_for(app) as client:
        response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readyz_is_ready_on_a_migrated_database(database: Database) -> None:
    async with client_for(create_app(Settings(), database=database)) as client:
        response = await client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready"}


async def test_readyz_is_503_on_an_unmigrated_database(blank_db: DbTarget) -> None:
    async with client_for(create_app(Settings(), database=blank_db.database())) as client:
        response = await client.get("/readyz")
    assert response.status_code == 503
    assert response.json() == {
        "status": "unavailable",
        "reason": "the database is not migrated; run `billing migrate`",
    }


async def test_readyz_is_503_when_the_database_is_unreachable() -> None:
    app = create_app(Settings(), database=Database.from_url("postgresql+asyncpg://x:pw@127.0.0.1:1/none"))
    async with client_for(app) as client:
        response = await client.get("/readyz")
    body = response.json()
    assert response.status_code == 503
    assert body["status"] == "unavailable"
    assert body["reason"].startswith("cannot reach the database")
    assert "pw" not in body["reason"]
