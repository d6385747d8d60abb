"""/healthz says the process is up; /readyz says whether the database can serve."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
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


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """The defaults, except that nothing is read from `.env` or written to the working directory
    (the sandbox's database lives beside the service's)."""
    return Settings(_env_file=None, database_url=f"sqlite+aiosqlite:///{tmp_path / 'billing.db'}")


async def test_healthz_answers_without_touching_the_database(settings: Settings) -> None:
    app = create_app(settings, database=Database.from_url("postgresql+asyncpg://x@127.0.0.1:1/none"))
    async with client_for(app) as client:
        response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readyz_is_ready_on_a_migrated_database(database: Database, settings: Settings) -> None:
    async with client_for(create_app(settings, database=database)) as client:
        response = await client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready"}


async def test_readyz_is_503_on_an_unmigrated_database(blank_db: DbTarget, settings: Settings) -> None:
    async with client_for(create_app(settings, database=blank_db.database())) as client:
        response = await client.get("/readyz")
    assert response.status_code == 503
    assert response.json() == {
        "status": "unavailable",
        "reason": "the database is not migrated; run `billing migrate`",
    }


async def test_readyz_is_503_when_the_database_is_unreachable(settings: Settings) -> None:
    app = create_app(settings, database=Database.from_url("postgresql+asyncpg://x:pw@127.0.0.1:1/none"))
    async with client_for(app) as client:
        response = await client.get("/readyz")
    body = response.json()
    assert response.status_code == 503
    assert body["status"] == "unavailable"
    assert body["reason"].startswith("cannot reach the database")
    assert "pw" not in body["reason"]
