"""Migrations build the schema on an empty database of each kind and agree with the models."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

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


def _layout(sync: Connection) -> dict[str, str]:
    """Each table's columns, keys, indexes and constraints as the database reports them, as text
    (reflected column types compare by identity, not by what they say)."""
    inspector = inspect(sync)
    return {
        table: repr(
            (
                [
                    (column["name"], str(column["type"]), column["nullable"], column.get("default"))
                    for column in inspector.get_columns(table)
                ],
                inspector.get_pk_constraint(table),
                sorted(map(repr, inspector.get_foreign_keys(table))),
                sorted(map(repr, inspector.get_indexes(table))),
                sorted(map(repr, inspector.get_unique_constraints(table))),
                sorted(map(repr, inspector.get_check_constraints(table))),
            )
        )
        for table in inspector.get_table_names()
    }


async def _revision_and_layout(target: DbTarget) -> tuple[str | None, dict[str, str]]:
    db = target.database()
    try:
        state = await migration_state(db.engine)
        async with db.read() as conn:
            return state.current, await conn.run_sync(_layout)
    finally:
        await db.dispose()


async def test_upgrade_twice_is_a_no_op(upgraded: DbTarget) -> None:
    before = await _revision_and_layout(upgraded)
    assert before[0] == head_revision()
    assert {table.name for table in metadata.sorted_tables} < set(before[1])

    await asyncio.to_thread(upgrade, upgraded.url, schema=upgraded.schema)  # blocking: not on the loop

    assert await _revision_and_layout(upgraded) == before


async def test_an_empty_database_has_no_tables_until_migrated(blank_db: DbTarget) -> None:
    assert await _tables(blank_db) == set()
    db = blank_db.database()
    try:
        await upgrade_engine(db.engine)  # the in-process path, from async code
    finally:
        await db.dispose()
    assert "billing_account" in await _tables(blank_db)
