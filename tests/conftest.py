"""Fixtures on real databases: PostgreSQL over asyncpg and SQLite over aiosqlite.

Every database test runs on both backends unless marked `postgres_only` or `sqlite_only`.
Each test module gets a fresh schema (PostgreSQL) or file (SQLite), migrated once; tables are
truncated before each test. No per-test rollback: concurrency tests need other connections to
see committed rows.
"""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest
from sqlalchemy import text

from billing.settings import Settings
from billing.stripe_gateway import StripeGateway
from db.engine import Database, create_engine
from db.migrate import upgrade
from db.models import metadata
from tests.gateways import SHORT_RETRIES, open_sandbox_gateway

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

    from tests.live import Live, LiveOptions

PG_HOST = os.environ.get("TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("TEST_PG_USER", "postgres")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" not in metafunc.fixturenames:
        return
    if metafunc.definition.get_closest_marker("postgres_only"):
        params = ["postgresql"]
    elif metafunc.definition.get_closest_marker("sqlite_only"):
        params = ["sqlite"]
    else:
        params = ["sqlite", "postgresql"]
    metafunc.parametrize("backend", params, indirect=True, scope="module")


def pg_url(database: str) -> str:
    return f"postgresql+asyncpg://{PG_USER}@{PG_HOST}:{PG_PORT}/{database}"


async def pg_admin(sql: str) -> None:
    conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database="postgres")
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A throw-away PostgreSQL database for this test session, dropped at the end."""
    name = f"billing_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    asyncio.run(pg_admin(f'CREATE DATABASE "{name}"'))
    try:
        yield name
    finally:
        asyncio.run(pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def fresh_pg_url() -> Iterator[str]:
    """A database of its own, for tests that run other processes (they cannot set a schema)."""
    name = f"billing_test_own_{uuid.uuid4().hex[:12]}"
    asyncio.run(pg_admin(f'CREATE DATABASE "{name}"'))
    try:
        yield pg_url(name)
    finally:
        asyncio.run(pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@dataclass(frozen=True)
class DbTarget:
    backend: str
    url: str
    schema: str | None = None

    def database(self) -> Database:
        return Database(create_engine(self.url, schema=self.schema), fast_reads=Settings().fast_paths)


@pytest.fixture(scope="module")
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _module_slug(request: pytest.FixtureRequest) -> str:
    return re.sub(r"[^a-z0-9]+", "_", request.module.__name__.rsplit(".", 1)[-1].lower())[:30]


def _new_target(
    backend: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> DbTarget:
    slug = _module_slug(request)
    if backend == "sqlite":
        path: Path = tmp_path_factory.mktemp(slug) / "billing.db"
        return DbTarget("sqlite", f"sqlite+aiosqlite:///{path}")
    pg_name = request.getfixturevalue("pg_database")
    schema = f"{slug}_{uuid.uuid4().hex[:6]}"
    asyncio.run(_create_schema(pg_name, schema))
    return DbTarget("postgresql", pg_url(pg_name), schema)


async def _create_schema(database: str, schema: str) -> None:
    conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database=database)
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
    finally:
        await conn.close()


@pytest.fixture
def blank_db(
    backend: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> DbTarget:
    """A new database with nothing in it, not even migrations."""
    return _new_target(backend, request, tmp_path_factory)


@pytest.fixture(scope="module")
def migrated_db(
    backend: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> DbTarget:
    """The module's own database, migrated once."""
    target = _new_target(backend, request, tmp_path_factory)
    upgrade(target.url, schema=target.schema)
    return target


@pytest.fixture
async def database(migrated_db: DbTarget) -> AsyncIterator[Database]:
    """The migrated database of this module, emptied before the test."""
    db = migrated_db.database()
    await truncate_all(db)
    try:
        yield db
    finally:
        await db.dispose()


async def truncate_all(db: Database) -> None:
    tables = [table.name for table in metadata.sorted_tables]
    async with db.write() as conn:
        if db.is_postgres:
            await conn.execute(text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))
        else:
            # SQLite has no TRUNCATE: lift the append-only triggers (billing_ledger) while emptying.
            triggers = (
                await conn.execute(text("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'"))
            ).all()
            for trigger in triggers:
                await conn.execute(text(f'DROP TRIGGER "{trigger.name}"'))
            for name in reversed(tables):
                await conn.execute(text(f"DELETE FROM {name}"))
            for trigger in triggers:
                await conn.execute(text(trigger.sql))


# A running service --------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Service:
    """The app served on a loopback port, as Stripe, a browser or the SDK reach it."""

    url: str
    app: Any
    database: Database
    sandbox_db: DbTarget


@pytest.fixture
def sandbox_db(
    backend: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> DbTarget:
    """A fresh, empty database for the Stripe sandbox (it creates its own tables)."""
    return _new_target(backend, request, tmp_path_factory)


@asynccontextmanager
async def serve(app: Any, port: int) -> AsyncIterator[None]:
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield
    finally:
        server.should_exit = True
        await task


def service_settings(url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "public_base_url": url,
        "app_url": "http://app.test",
        "sandbox_sync_catalog": False,  # tests that need the catalog sync it themselves
        "account_cache_seconds": 0,  # as graphql_support.NO_ACCOUNT_CACHE says
        **overrides,
    }
    return Settings(**values)


@asynccontextmanager
async def running_service(
    database: Database,
    sandbox_db: DbTarget,
    *,
    notifier: Any = None,
    sandbox: dict[str, Any] | None = None,
    **overrides: Any,
) -> AsyncIterator[Service]:
    """Serve the whole app in sandbox mode on a free port.

    `overrides` are settings; `sandbox` overrides fields of the sandbox's configuration.
    """
    from graph.app import create_app, sandbox_config

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    settings = service_settings(url, **overrides)
    config = replace(
        sandbox_config(settings), database_url=sandbox_db.url, schema=sandbox_db.schema, **(sandbox or {})
    )
    app = create_app(settings, database=database, sandbox=config, notifier=notifier)
    async with serve(app, port):
        yield Service(url=url, app=app, database=database, sandbox_db=sandbox_db)


@pytest.fixture
async def service(database: Database, sandbox_db: DbTarget) -> AsyncIterator[Service]:
    """The whole service in sandbox mode on a real port, over this module's databases."""
    async with running_service(database, sandbox_db) as running:
        yield running


@pytest.fixture
async def stripe_gateway(service: Service) -> AsyncIterator[StripeGateway]:
    """The project's gateway (the real SDK) pointed at the running service's sandbox."""
    async with open_sandbox_gateway(service.url, **SHORT_RETRIES) as gateway:
        yield gateway


@pytest.fixture
def live_options() -> LiveOptions:
    """How the `live` service is set up: as `service` is. A module overrides this fixture for other
    settings, another notifier or another sandbox delivery."""
    from tests.live import LiveOptions  # here: tests/live.py imports this module

    return LiveOptions()


@pytest.fixture
async def live(database: Database, sandbox_db: DbTarget, live_options: LiveOptions) -> AsyncIterator[Live]:
    """The whole service in sandbox mode on a real port, set up as `live_options` says, with the
    project's gateway on its sandbox and the shipped catalog synced into it (tests/live.py).
    A test takes this or `service`, not both: each serves a sandbox over `sandbox_db`."""
    from tests.live import start_live  # here: tests/live.py imports this module

    async with start_live(database, sandbox_db, live_options) as running:
        yield running


# One migrated SQLite database per module, for tests of HTTP-level refusals that need no PostgreSQL.


@pytest.fixture(scope="module")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('sqlite') / 'billing.db'}"
    upgrade(url)
    return url


@pytest.fixture
async def db(sqlite_url: str) -> AsyncIterator[Database]:
    database = Database.from_url(sqlite_url)
    try:
        yield database
    finally:
        await database.dispose()


# Headless Chromium, one per browser-test module (tests/browser_support.py) ---------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    from tests.browser_support import chromium

    with chromium() as driver:
        yield driver


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where a module's screenshots go (docs/front-door.md says how they reach docs/)."""
    from tests.browser_support import screenshots_dir

    return screenshots_dir(tmp_path_factory)
