"""Migrations build the schema on an empty database of each kind and agree with the models."""

from __future__ import annotations

from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from db.migrate import head_revision, migration_state, upgrade, upgrade_engine
from db.models import metadata
from tests.conftest import DbTarget


async def _tables(target: DbTarget) -> set[str]:
    db = target.database()
    try:
        async with db.read() as conn:
            return set(await conn.run_sync(lambda sync: inspect(sync).get_table_names()))
    finally:
        await db.dispose()


async def _diff(target: DbTarget) -> list[Any]:
    db = target.database()
    try:
        async with db.read() as conn:
            return await conn.run_sync(
                lambda sync: compare_metadata(
                    MigrationContext.configure(sync, opts={"compare_type": True}), metadata
                )
            )
    finally:
        await db.dispose()


@pytest.fixture(scope="module")
def upgraded(migrated_db: DbTarget) -> DbTarget:
    """A database that was empty, upgraded to head by the migrations."""
    return migrated_db


async def test_upgrade_head_creates_every_table(upgraded: DbTarget) -> None:
    tables = await _tables(upgraded)
    assert {table.name for table in metadata.sorted_tables} | {"alembic_version"} == tables


async def test_the_database_is_at_head_after_upgrade(upgraded: DbTarget) -> None:
    db = upgraded.database()
    try:
        state = await migration_state(db.engine)
    finally:
        await db.dispose()
    assert state.current == head_revision()
    assert state.up_to_date


async def test_models_and_migrations_agree(upgraded: DbTarget) -> None:
    assert await _diff(upgraded) == []


def test_upgrade_twice_is_a_no_op(upgraded: DbTarget) -> None:
    upgrade(upgraded.url, schema=upgraded.schema)


async def test_an_empty_database_has_no_tables_until_migrated(blank_db: DbTarget) -> None:
    assert await _tables(blank_db) == set()
    db = blank_db.database()
    try:
        await upgrade_engine(db.engine)  # the in-process path, from async code
    finally:
        await db.dispose()
    assert "billing_account" in await _tables(blank_db)
