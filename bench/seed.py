"""The bench's database: a throw-away PostgreSQL database, migrated and seeded in SQL.

Accounts and usage records are written with `generate_series` (a million usage records take a
few seconds); the hourly rollups and the window totals of the current and the previous quota
window are then summed from the records, which is what `record_usage` would have upserted one
record at a time. `bench/usage_read.py` shares `add_usage`. `add_placed_usage` is issue 23's
placements. `inbox_effects` is the duplicate storm's check.
"""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg
from sqlalchemy import bindparam, delete, insert, text

from billing.access import SubscriptionState, account_state_select
from billing.usage import hour_of, quota_window
from db.engine import Database
from db.models import account_table, rollup_table, usage_table, usage_total_table
from db.types import UTCDateTime

ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
USAGE_SPREAD = timedelta(days=34)
# A monthly period that started 29 days 13:37:42 ago: the window's edges are partial hours.
PERIOD_AGE = timedelta(days=29, hours=13, minutes=37, seconds=42)
PLACED = 1_000_000  # add_placed_usage's records


def new_database_name() -> str:
    return f"bench_{secrets.token_hex(4)}"


async def _admin(statement: str, admin_dsn: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def create_database(name: str, admin_dsn: str = ADMIN_DSN) -> None:
    await _admin(f'CREATE DATABASE "{name}"', admin_dsn)


async def drop_database(name: str, admin_dsn: str = ADMIN_DSN) -> None:
    await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', admin_dsn)


async def add_accounts(
    conn: asyncpg.Connection, prefix: str, count: int, now: datetime, *, tier: str = "pro"
) -> list[int]:
    """`count` users `<prefix>0` ... with an active monthly subscription; their account ids."""
    rows = await conn.fetch(
        """
        INSERT INTO billing_account (user_id, email, stripe_customer_id, stripe_subscription_id, tier,
            interval, status, current_period_start, current_period_end, cancel_at_period_end, trial_used,
            created_at, updated_at)
        SELECT $1 || n, $1 || n || '@example.test', 'cus_' || $1 || n, 'sub_' || $1 || n, $2,
            'monthly', 'active', $3::timestamptz - $4::interval,
            $3::timestamptz - $4::interval + interval '30 days',
            false, true, $3, $3
        FROM generate_series(0, $5 - 1) AS n
        ORDER BY n
        RETURNING id
        """,
        prefix,
        tier,
        now,
        PERIOD_AGE,
        count,
    )
    return [row["id"] for row in rows]


async def add_usage(database: Database, account_id: int, start: int, stop: int, now: datetime) -> None:
    """Records number `start` .. `stop - 1` of `account_id`'s `api_calls`, then its rollups again.

    Records are spread evenly over the 34 days before `now` (each added range too), with a
    jitter inside the hour, quantities 1 to 5, idempotency keys `bench-<n>`.
    """
    first = now - USAGE_SPREAD
    if database.is_postgres:
        async with database.write() as conn:
            await conn.execute(
                text(
                    """
                    INSERT INTO usage_record (account_id, feature, quantity, recorded_at, idempotency_key,
                        created_at)
                    SELECT :account, 'api_calls', 1 + n % 5,
                        CAST(:first AS timestamptz)
                            + make_interval(secs => :spread * (n - :start) / (:stop - :start))
                            - make_interval(secs => (n * 7919) % 3600),
                        'bench-' || n, :now
                    FROM generate_series(CAST(:start AS bigint), :stop - 1) AS n
                    """
                ),
                {
                    "account": account_id,
                    "first": first,
                    "spread": USAGE_SPREAD.total_seconds(),
                    "start": start,
                    "stop": stop,
                    "now": now,
                },
            )
            await conn.execute(delete(rollup_table).where(rollup_table.c.account_id == account_id))
            await conn.execute(
                text(
                    """
                    INSERT INTO usage_rollup (account_id, feature, hour, quantity)
                    SELECT account_id, feature, date_trunc('hour', recorded_at, 'UTC'), sum(quantity)
                    FROM usage_record WHERE account_id = :account GROUP BY 1, 2, 3
                    """
                ),
                {"account": account_id},
            )
        await add_totals(database, account_id, now)
        return
    # SQLite: the same rows from Python, in chunks.
    rows: list[dict[str, Any]] = []
    for n in range(start, stop):
        at = first + USAGE_SPREAD * ((n - start) / (stop - start)) - timedelta(seconds=(n * 7919) % 3600)
        rows.append(
            {
                "account_id": account_id,
                "feature": "api_calls",
                "quantity": 1 + n % 5,
                "recorded_at": at,
                "idempotency_key": f"bench-{n}",
                "created_at": now,
            }
        )
        if len(rows) == 5_000 or n == stop - 1:
            async with database.write() as conn:
                await conn.execute(insert(usage_table), rows)
            rows = []
    async with database.write() as conn:
        result = await conn.execute(
            usage_table.select()
            .with_only_columns(usage_table.c.recorded_at, usage_table.c.quantity)
            .where(usage_table.c.account_id == account_id)
        )
        hours: Counter[datetime] = Counter()
        for recorded_at, quantity in result:
            hours[hour_of(recorded_at)] += int(quantity)
        await conn.execute(delete(rollup_table).where(rollup_table.c.account_id == account_id))
        await conn.execute(
            insert(rollup_table),
            [
                {"account_id": account_id, "feature": "api_calls", "hour": hour, "quantity": quantity}
                for hour, quantity in sorted(hours.items())
            ],
        )
    await add_totals(database, account_id, now)


async def add_placed_usage(database: Database, account_id: int, now: datetime, total: int = PLACED) -> None:
    """Issue 23's placements (PostgreSQL), 1,000,000 `api_calls` records: 100,000 in the window's
    first partial hour, 100,000 in the current hour, 100,000 late ones in the hour before the
    window started (the previous window; the rollup of the window's first hour holds some of
    them), and 700,000 spread over the window; then the rollups and totals as `add_usage`."""
    tenth = total // 10
    start = now - PERIOD_AGE
    first_whole = hour_of(start) + timedelta(hours=1)
    placements = [
        (start, first_whole, tenth),
        (hour_of(now), now, tenth),
        (start - timedelta(hours=1), start, tenth),
        (start, now, total - 3 * tenth),
    ]
    first = 0
    async with database.write() as conn:
        for lo, hi, count in placements:
            await conn.execute(
                text(
                    """
                    INSERT INTO usage_record (account_id, feature, quantity, recorded_at, idempotency_key,
                        created_at)
                    SELECT :account, 'api_calls', 1 + n % 5,
                        CAST(:lo AS timestamptz) + make_interval(secs => :seconds * (n - :first) / :count),
                        'placed-' || n, :now
                    FROM generate_series(CAST(:first AS bigint), :first + :count - 1) AS n
                    """
                ),
                {
                    "account": account_id,
                    "lo": lo,
                    "seconds": (hi - lo).total_seconds(),
                    "first": first,
                    "count": count,
                    "now": now,
                },
            )
            first += count
        await conn.execute(
            text(
                """
                INSERT INTO usage_rollup (account_id, feature, hour, quantity)
                SELECT account_id, feature, date_trunc('hour', recorded_at, 'UTC'), sum(quantity)
                FROM usage_record WHERE account_id = :account GROUP BY 1, 2, 3
                """
            ),
            {"account": account_id},
        )
    await add_totals(database, account_id, now)


async def add_totals(database: Database, account_id: int, now: datetime) -> None:
    """The account's totals of its current and previous quota windows, summed from its records."""
    async with database.write() as conn:
        row = (await conn.execute(account_state_select(account_table.c.id == account_id))).mappings().one()
        state = SubscriptionState.from_row(row)
        current = quota_window(state, now)
        windows = (current, quota_window(state, current.start - timedelta(microseconds=1)))
        t = usage_total_table.c
        await conn.execute(delete(usage_total_table).where(t.account_id == account_id))
        for window in windows:
            await conn.execute(
                text(
                    """
                    INSERT INTO usage_window_total (account_id, feature, window_start, window_end, quantity)
                    SELECT account_id, feature, :start, :end, sum(quantity) FROM usage_record
                    WHERE account_id = :account AND recorded_at >= :start AND recorded_at < :end
                    GROUP BY account_id, feature
                    """
                ).bindparams(bindparam("start", type_=UTCDateTime()), bindparam("end", type_=UTCDateTime())),
                {"account": account_id, "start": window.start, "end": window.end},
            )


@dataclass(frozen=True)
class InboxEffects:
    """What the inbox holds for a set of event ids."""

    expected: int  # distinct event ids sent
    rows: int  # inbox rows with those ids
    applied_once: int  # rows applied (processed or ignored) in exactly one attempt
    pending: int  # rows not applied yet
    statuses: dict[str, int]

    @property
    def exactly_once(self) -> bool:
        return self.rows == self.expected == self.applied_once and self.pending == 0


async def inbox_effects(conn: asyncpg.Connection, event_ids: Sequence[str]) -> InboxEffects:
    rows = await conn.fetch(
        "SELECT status, attempts FROM stripe_event WHERE id = ANY($1::text[])", list(event_ids)
    )
    statuses = Counter(row["status"] for row in rows)
    return InboxEffects(
        expected=len(set(event_ids)),
        rows=len(rows),
        applied_once=sum(
            1 for row in rows if row["status"] in {"processed", "ignored"} and row["attempts"] == 1
        ),
        pending=sum(1 for row in rows if row["status"] in {"pending", "processing"}),
        statuses=dict(statuses),
    )
