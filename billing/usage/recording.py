"""Recording usage: validated, idempotent per account and key, all or nothing.

Every item is validated before anything is written, and one write transaction holds the insert
(one `INSERT ... ON CONFLICT (account_id, idempotency_key) DO NOTHING RETURNING` for the whole
batch, then one read-back of the keys that were already there, to tell a retry from a conflict),
the upsert of the hourly rollups that the daily series read, and then of the quota windows'
running totals that quota reads read (`billing/usage/window_totals.py`, `thresholds.py`). A
single record on PostgreSQL goes through `billing/usage/singles.py` (one statement, or group
commit with the calls concurrent with it).

Recording never refuses over quota (the use has happened; it must be billed): the quota check
is the caller's, before the use (`billing/usage/windows.py` gives the bound).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    and_,
    or_,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from billing.access import (
    MAX_USER_ID_LENGTH,
    AccessPolicy,
    SubscriptionState,
    account_states,
    check_feature_name,
    effective_tier,
    is_plain_text,
    is_user_id,
)
from billing.clock import utcnow
from billing.errors import BillingError, ErrorCode
from billing.host_events.events import HostEventConfig
from billing.metrics import USAGE_RECORDS
from billing.plans import Catalog
from billing.usage.thresholds import add_to_totals
from billing.usage.window_totals import hour_of
from db.engine import Database
from db.enums import Tier
from db.models import rollup_table, usage_table

MAX_BATCH = 1000
DEFAULT_MAX_QUANTITY = 1_000_000  # USAGE_MAX_QUANTITY
MAX_FUTURE = timedelta(minutes=5)  # Stripe's meter events accept timestamps up to 5 minutes ahead
MAX_AGE = timedelta(days=35)  # ... and up to 35 days back
MAX_KEY_LENGTH = 255
DEFAULT_PAST_DUE_GRACE = timedelta(days=7)


# Recording -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UsageInput:
    """One use to record. `recorded_at` defaults to now."""

    user_id: str
    feature: str
    quantity: int
    idempotency_key: str
    recorded_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class RecordedUsage:
    """A stored usage record. `duplicate`: the key was recorded before; this is the original."""

    id: int
    user_id: str
    feature: str
    quantity: int
    recorded_at: datetime
    idempotency_key: str
    duplicate: bool


def _bad_input(index: int, field: str, message: str) -> BillingError:
    return BillingError(message, code=ErrorCode.BAD_USER_INPUT, index=index, field=field)


def validate_usage(
    record: UsageInput, index: int, *, catalog: Catalog, now: datetime, max_quantity: int
) -> datetime:
    """Check one item; returns its `recorded_at`. Raises BAD_USER_INPUT naming the item and field."""
    if not is_user_id(record.user_id):
        raise _bad_input(
            index,
            "userId",
            f"userId must be 1 to {MAX_USER_ID_LENGTH} characters, none of them control characters",
        )
    try:
        check_feature_name(record.feature)
    except BillingError as exc:
        raise _bad_input(index, "feature", exc.message) from None
    if record.feature not in catalog.all_features:
        raise _bad_input(index, "feature", f"unknown feature {record.feature!r}: no plan has it")
    if isinstance(record.quantity, bool) or not isinstance(record.quantity, int):
        raise _bad_input(index, "quantity", "quantity must be a whole number")
    if not 1 <= record.quantity <= max_quantity:
        raise _bad_input(index, "quantity", f"quantity must be between 1 and {max_quantity}")
    key = record.idempotency_key
    if not key or not key.strip() or len(key) > MAX_KEY_LENGTH or not is_plain_text(key):
        raise _bad_input(
            index,
            "idempotencyKey",
            f"idempotencyKey must be 1 to {MAX_KEY_LENGTH} characters, none of them control characters",
        )
    at = record.recorded_at
    if at is None:
        return now
    if at.tzinfo is None or at.utcoffset() is None:
        raise _bad_input(index, "recordedAt", "recordedAt must include a time zone (e.g. ...Z)")
    at = at.astimezone(UTC)
    if at > now + MAX_FUTURE:
        raise _bad_input(index, "recordedAt", "recordedAt is more than 5 minutes in the future")
    if at < now - MAX_AGE:
        raise _bad_input(
            index, "recordedAt", "recordedAt is more than 35 days ago (Stripe's meter event window)"
        )
    return at


@dataclass(frozen=True, slots=True)
class _Statements:
    """The hot writes of `record_usage`, built once per dialect so their compiled form is cached."""

    insert_usage: Any  # INSERT ... ON CONFLICT DO NOTHING RETURNING, rows as parameters
    add_to_rollup: Any  # INSERT ... ON CONFLICT DO UPDATE quantity = quantity + excluded

    @classmethod
    def build(cls, insert: Any) -> _Statements:
        rollup = insert(rollup_table)
        return cls(
            insert_usage=insert(usage_table)
            .on_conflict_do_nothing(index_elements=["account_id", "idempotency_key"])
            .returning(
                usage_table.c.id,
                usage_table.c.account_id,
                usage_table.c.idempotency_key,
                usage_table.c.feature,
                usage_table.c.quantity,
                usage_table.c.recorded_at,
            ),
            add_to_rollup=rollup.on_conflict_do_update(
                index_elements=["account_id", "feature", "hour"],
                set_={"quantity": rollup_table.c.quantity + rollup.excluded.quantity},
            ),
        )


_STATEMENTS = {"postgresql": _Statements.build(postgresql.insert), "sqlite": _Statements.build(sqlite.insert)}


def _statements(database: Database) -> _Statements:
    return _STATEMENTS[database.engine.dialect.name]


async def record_usage(
    *,
    database: Database,
    catalog: Catalog,
    records: Sequence[UsageInput],
    now: datetime | None = None,
    max_quantity: int = DEFAULT_MAX_QUANTITY,
    past_due_grace: timedelta = DEFAULT_PAST_DUE_GRACE,
    host_events: HostEventConfig | None = None,
) -> list[RecordedUsage]:
    """Record usage, all or nothing; returns one record per input, in order.

    The same idempotency key for the same account records once and returns the original (also
    within one batch); the same key with another feature or quantity is IDEMPOTENCY_CONFLICT.
    Refusals carry `extensions.index` (the item) and write nothing: BAD_USER_INPUT (unknown
    feature, quantity out of 1..max_quantity, recordedAt outside Stripe's window, more than
    1,000 items), NO_BILLING_ACCOUNT (unknown user), NO_SUBSCRIPTION (no live subscription).

    Each new record adds to its quota window's running total in the same transaction (for a
    single record on PostgreSQL, within its one statement; billing/usage/window_totals.py); with
    `host_events`, a record crossing 80% or 100% writes `usage.threshold`.
    """
    now = now or utcnow()
    if len(records) > MAX_BATCH:
        raise BillingError(
            f"at most {MAX_BATCH} usage records per batch (got {len(records)})",
            code=ErrorCode.BAD_USER_INPUT,
            field="inputs",
        )
    if not records:
        return []
    times = [
        validate_usage(record, index, catalog=catalog, now=now, max_quantity=max_quantity)
        for index, record in enumerate(records)
    ]
    # The same key twice in one batch: the second is a retry of the first, or a conflict.
    first_of: dict[tuple[str, str], int] = {}
    for index, record in enumerate(records):
        seen = first_of.setdefault((record.user_id, record.idempotency_key), index)
        if seen != index:
            _check_same(records[seen], record, index)

    if len(records) == 1 and database.is_postgres:
        from billing.usage.singles import record_single  # it uses this module's writes

        policy = AccessPolicy(catalog=catalog, past_due_grace=past_due_grace)
        return [await record_single(database, policy, host_events, records[0], times[0], now)]
    written = 0
    async with database.write() as conn:
        states: dict[int, SubscriptionState] = {}
        accounts = await _live_accounts(conn, records, now, past_due_grace, states)
        rows = [
            {
                "account_id": accounts[records[index].user_id],
                "feature": records[index].feature,
                "quantity": records[index].quantity,
                "recorded_at": times[index],
                "idempotency_key": records[index].idempotency_key,
                "created_at": now,
            }
            for index in sorted(
                first_of.values(), key=lambda i: (records[i].user_id, records[i].idempotency_key)
            )
        ]
        # One statement built at import, the rows as parameters: SQLAlchemy compiles it once (a
        # `.values(rows)` statement is a new one each time, compiled again on every call).
        inserted = await conn.execute(_statements(database).insert_usage, rows)
        new = {(row.account_id, row.idempotency_key): row for row in inserted}
        keys = [(accounts[records[i].user_id], records[i].idempotency_key) for i in first_of.values()]
        existing = await _existing(conn, [key for key in keys if key not in new])
        results: list[RecordedUsage] = []
        for index, record in enumerate(records):
            key = (accounts[record.user_id], record.idempotency_key)
            row = new.get(key)
            duplicate = row is None or first_of[(record.user_id, record.idempotency_key)] != index
            if row is None:
                row = existing[key]
                _check_same_row(row, record, index)
            results.append(_recorded(row, record.user_id, duplicate=duplicate))
        await _add_to_rollups(database, conn, new.values())
        if new:
            written = await add_to_totals(
                conn,
                database,
                host_events,
                AccessPolicy(catalog=catalog, past_due_grace=past_due_grace),
                rows=new.values(),
                states=states,
                now=now,
            )
    USAGE_RECORDS.inc(len(new))  # committed
    if host_events is not None and written:
        host_events.notify_written()
    return results


def _recorded(row: Any, user_id: str, *, duplicate: bool) -> RecordedUsage:
    return RecordedUsage(
        id=row.id,
        user_id=user_id,
        feature=row.feature,
        quantity=int(row.quantity),
        recorded_at=row.recorded_at,
        idempotency_key=row.idempotency_key,
        duplicate=duplicate,
    )


def _check_same(original: UsageInput, retry: UsageInput, index: int) -> None:
    if (original.feature, original.quantity) != (retry.feature, retry.quantity):
        raise _conflict(retry, original.feature, original.quantity, index)


def _check_same_row(row: Any, record: UsageInput, index: int) -> None:
    if (row.feature, int(row.quantity)) != (record.feature, record.quantity):
        raise _conflict(record, row.feature, int(row.quantity), index)


def _conflict(record: UsageInput, feature: str, quantity: int, index: int) -> BillingError:
    return BillingError(
        f"idempotency key {record.idempotency_key!r} was already used for {quantity} x {feature!r}; "
        "use a new key for a different use",
        code=ErrorCode.IDEMPOTENCY_CONFLICT,
        index=index,
        field="idempotencyKey",
    )


async def _live_accounts(
    conn: AsyncConnection,
    records: Sequence[UsageInput],
    now: datetime,
    grace: timedelta,
    states: dict[int, SubscriptionState] | None = None,
) -> dict[str, int]:
    """user id -> account id, for users whose subscription grants access now; else the refusal.
    (`states`, when given, receives each account's state by account id.)"""
    found = await account_states(conn, sorted({record.user_id for record in records}))
    accounts: dict[str, int] = {}
    for index, record in enumerate(records):
        if record.user_id in accounts:
            continue
        state = found.get(record.user_id)
        refusal = account_refusal(state, record, index, now, grace)
        if refusal is not None:
            raise refusal
        assert state is not None and state.account_id is not None
        accounts[record.user_id] = state.account_id
        if states is not None:
            states[state.account_id] = state
    return accounts


def account_refusal(
    state: SubscriptionState | None, record: UsageInput, index: int, now: datetime, grace: timedelta
) -> BillingError | None:
    """NO_BILLING_ACCOUNT or NO_SUBSCRIPTION for the user's account state, or None: it may record."""
    if state is None or state.account_id is None:
        return BillingError(
            f"no billing account for user {record.user_id!r}",
            code=ErrorCode.NO_BILLING_ACCOUNT,
            index=index,
            userId=record.user_id,
        )
    if effective_tier(state, now=now, past_due_grace=grace) is Tier.NONE:
        return BillingError(
            f"user {record.user_id!r} has no live subscription (status {state.status.value})",
            code=ErrorCode.NO_SUBSCRIPTION,
            index=index,
            userId=record.user_id,
        )
    return None


async def _existing(conn: AsyncConnection, keys: list[tuple[int, str]]) -> dict[tuple[int, str], Any]:
    if not keys:
        return {}
    by_account: dict[int, list[str]] = {}
    for account_id, key in keys:
        by_account.setdefault(account_id, []).append(key)
    c = usage_table.c
    rows = await conn.execute(
        select(c.id, c.account_id, c.idempotency_key, c.feature, c.quantity, c.recorded_at).where(
            or_(
                *(
                    and_(c.account_id == account_id, c.idempotency_key.in_(account_keys))
                    for account_id, account_keys in by_account.items()
                )
            )
        )
    )
    return {(row.account_id, row.idempotency_key): row for row in rows}


async def _add_to_rollups(database: Database, conn: AsyncConnection, rows: Iterable[Any]) -> None:
    sums: dict[tuple[int, str, datetime], int] = {}
    for row in rows:
        key = (row.account_id, row.feature, hour_of(row.recorded_at))
        sums[key] = sums.get(key, 0) + int(row.quantity)
    if not sums:
        return
    await conn.execute(
        _statements(database).add_to_rollup,
        [
            {"account_id": account_id, "feature": feature, "hour": hour, "quantity": quantity}
            for (account_id, feature, hour), quantity in sorted(sums.items())  # one lock order
        ],
    )


# Quota windows -------------------------------------------------------------------------------
