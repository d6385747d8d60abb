"""Is the database reachable and migrated? Used by `/readyz` and before `billing serve`."""

from __future__ import annotations

import asyncio

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from db.migrate import migration_state

CHECK_TIMEOUT_SECONDS = 5.0


class DatabaseNotReady(Exception):
    """The database cannot serve requests. The message says why and what to run."""


async def ensure_ready(engine: AsyncEngine) -> None:
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_SECONDS):
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            state = await migration_state(engine)
    except TimeoutError:
        raise DatabaseNotReady(
            f"the database did not answer within {CHECK_TIMEOUT_SECONDS:g}s; check DATABASE_URL"
        ) from None
    except (OperationalError, DBAPIError, OSError) as exc:
        reason = _first_line(exc.orig if isinstance(exc, DBAPIError) else exc)
        raise DatabaseNotReady(f"cannot reach the database ({reason}); check DATABASE_URL") from None
    if state.current is None:
        raise DatabaseNotReady("the database is not migrated; run `billing migrate`")
    if not state.up_to_date:
        raise DatabaseNotReady(
            f"the database is at migration {state.current}, the code needs {state.head}; "
            "run `billing migrate`"
        )


def _first_line(exc: BaseException | None) -> str:
    text_ = str(exc).strip().splitlines()
    return text_[0] if text_ else type(exc).__name__
