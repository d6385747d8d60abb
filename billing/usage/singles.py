"""A single `record_usage` on PostgreSQL: alone in one statement, or by group commit.

Concurrent one-record calls in one process (`recordUsage` under load) are written together: the
first starts a write at once, and the calls that arrive while it runs wait and are written as
the next group, in one transaction (billing/usage/group_commit.py): one account read, one insert
of every record, one read-back of keys already stored, one rollup upsert, the totals. Each
caller is answered after that commit, with its own result: its record, `duplicate` when its
idempotency key was stored before (or earlier in the group), or its own refusal (an unknown
user, no live subscription, an idempotency conflict), which writes nothing and does not refuse
the others. A group of one is the one-statement path below (two round trips).
"""

from __future__ import annotations

import asyncio
import functools
import weakref
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, false, select, true, union_all
from sqlalchemy.dialects import postgresql

from billing.access import AccessPolicy, SubscriptionState, account_states
from billing.errors import BillingError
from billing.host_events.events import HostEventConfig
from billing.metrics import USAGE_RECORDS
from billing.usage.group_commit import GroupCommit
from billing.usage.recording import (
    MAX_BATCH,
    RecordedUsage,
    UsageInput,
    _add_to_rollups,
    _check_same_row,
    _conflict,
    _existing,
    _live_accounts,
    _recorded,
    _statements,
    account_refusal,
)
from billing.usage.thresholds import add_to_totals, one_record_parameters, threshold_parameters
from billing.usage.window_totals import hour_of, total_ctes
from db.engine import Database
from db.models import rollup_table, usage_table

Single = tuple[UsageInput, datetime, datetime]  # the record, its recordedAt, the caller's now


def _record_one_statement(*, with_thresholds: bool = False) -> Any:
    """PostgreSQL, one record in one atomic statement (autocommit, one round trip): the insert
    (ON CONFLICT on the idempotency key DO NOTHING), its hour's rollup upsert and its window
    total's when it inserted, and the row already stored under the key when it did not (`new`
    tells which)."""
    c = usage_table.c
    inserted = (
        postgresql.insert(usage_table)
        .values(
            account_id=bindparam("account_id"),
            feature=bindparam("feature"),
            quantity=bindparam("quantity"),
            recorded_at=bindparam("recorded_at"),
            idempotency_key=bindparam("idempotency_key"),
            created_at=bindparam("created_at"),
        )
        .on_conflict_do_nothing(index_elements=["account_id", "idempotency_key"])
        .returning(c.id, c.account_id, c.idempotency_key, c.feature, c.quantity, c.recorded_at)
        .cte("inserted")
    )
    rollup = postgresql.insert(rollup_table).from_select(
        ["account_id", "feature", "hour", "quantity"],
        select(
            inserted.c.account_id,
            inserted.c.feature,
            bindparam("hour", type_=rollup_table.c.hour.type),
            inserted.c.quantity,
        ),
    )
    added = (
        rollup.on_conflict_do_update(
            index_elements=["account_id", "feature", "hour"],
            set_={"quantity": rollup_table.c.quantity + rollup.excluded.quantity},
        )
        .returning(rollup_table.c.account_id, rollup_table.c.feature)
        .cte("added")
    )
    i = inserted.c
    return union_all(
        select(
            i.id, i.account_id, i.idempotency_key, i.feature, i.quantity, i.recorded_at, true().label("new")
        ),
        select(
            c.id, c.account_id, c.idempotency_key, c.feature, c.quantity, c.recorded_at, false().label("new")
        ).where(c.account_id == bindparam("account_id"), c.idempotency_key == bindparam("idempotency_key")),
    ).add_cte(added, *total_ctes(added, thresholds=with_thresholds))


_RECORD_ONE = _record_one_statement()
# ... and the usage.threshold events (billing/usage/window_totals.py).
_RECORD_ONE_WITH_EVENTS = _record_one_statement(with_thresholds=True)


async def _record_one(
    database: Database,
    record: UsageInput,
    at: datetime,
    now: datetime,
    policy: AccessPolicy,
    host_events: HostEventConfig | None,
) -> RecordedUsage:
    """One record on PostgreSQL in two round trips instead of six (BEGIN, the account, the
    insert, the rollup, the total, COMMIT): the account read, then `_RECORD_ONE`, each in
    autocommit. The transaction's account read took no lock either, so the answers are the same.
    With host events, the same statement also writes `usage.threshold`."""
    async with database.write_one() as conn:
        states: dict[int, SubscriptionState] = {}
        account_id = (await _live_accounts(conn, [record], now, policy.past_due_grace, states))[
            record.user_id
        ]
        key = (account_id, record.idempotency_key)
        parameters = {
            "account_id": account_id,
            "feature": record.feature,
            "quantity": record.quantity,
            "recorded_at": at,
            "idempotency_key": record.idempotency_key,
            "created_at": now,
            "hour": hour_of(at),
            **one_record_parameters(states[account_id], record, at),
        }
        statement = _RECORD_ONE
        events = threshold_parameters(host_events, policy, states[account_id], record, at, now)
        if events is not None:
            statement, parameters = _RECORD_ONE_WITH_EVENTS, {**parameters, **events}
        rows = (await conn.execute(statement, parameters)).all()
        row: Any = next((row for row in rows if row.new), None)
        duplicate = row is None
        if row is None:
            # Stored before this statement's snapshot, or by a transaction that committed while
            # the insert waited for it (not in the snapshot): read it again then.
            row = rows[0] if rows else (await _existing(conn, [key]))[key]
            _check_same_row(row, record, 0)
    return _recorded(row, record.user_id, duplicate=duplicate)


_GROUPS: weakref.WeakKeyDictionary[Database, dict[tuple[Any, ...], Any]] = weakref.WeakKeyDictionary()


async def record_single(
    database: Database,
    policy: AccessPolicy,
    host_events: HostEventConfig | None,
    record: UsageInput,
    at: datetime,
    now: datetime,
) -> RecordedUsage:
    """Record one validated use; answered once it is committed."""
    groups = _GROUPS.setdefault(database, {})
    key = (id(policy.catalog), id(host_events), policy.past_due_grace)
    entry = groups.get(key)
    if (
        entry is None
        or entry[1] is not policy.catalog
        or entry[2] is not host_events
        or entry[0].loop is not asyncio.get_running_loop()  # a test's loop, closed since
    ):
        write = functools.partial(_write, database, policy, host_events)
        entry = (GroupCommit(write, max_group=MAX_BATCH), policy.catalog, host_events)
        groups[key] = entry
    group: GroupCommit[Single, RecordedUsage] = entry[0]
    return await group.submit((record, at, now))


async def _write(
    database: Database, policy: AccessPolicy, host_events: HostEventConfig | None, group: list[Single]
) -> list[RecordedUsage | Exception]:
    """One group, one transaction; the answers in order (a refusal is that caller's answer)."""
    if len(group) == 1:
        record, at, now = group[0]
        try:
            recorded = await _record_one(database, record, at, now, policy, host_events)
        except BillingError as exc:
            return [exc]
        if not recorded.duplicate:
            USAGE_RECORDS.inc()
        return [recorded]
    answers: list[RecordedUsage | Exception | None] = [None] * len(group)
    keys: list[tuple[int, str] | None] = []
    first: dict[tuple[int, str], int] = {}  # the caller whose row is inserted, per key
    states: dict[int, SubscriptionState] = {}
    async with database.write() as conn:
        found = await account_states(conn, sorted({record.user_id for record, _, _ in group}))
        for index, (record, _at, now) in enumerate(group):
            state = found.get(record.user_id)
            refusal = account_refusal(state, record, 0, now, policy.past_due_grace)
            if refusal is not None or state is None or state.account_id is None:
                answers[index] = refusal
                keys.append(None)
                continue
            states[state.account_id] = state
            keys.append((state.account_id, record.idempotency_key))
            first.setdefault((state.account_id, record.idempotency_key), index)
        rows = [
            {
                "account_id": key[0],
                "feature": group[index][0].feature,
                "quantity": group[index][0].quantity,
                "recorded_at": group[index][1],
                "idempotency_key": key[1],
                "created_at": group[index][2],
            }
            # the batch path's lock order: by user, then key
            for key, index in sorted(first.items(), key=lambda item: (group[item[1]][0].user_id, item[0][1]))
        ]
        new: dict[tuple[int, str], Any] = {}
        if rows:
            inserted = await conn.execute(_statements(database).insert_usage, rows)
            new = {(row.account_id, row.idempotency_key): row for row in inserted}
        existing = await _existing(conn, [key for key in first if key not in new])
        for index, key in enumerate(keys):
            if key is None:
                continue
            record = group[index][0]
            row = new.get(key) or existing[key]
            if (row.feature, int(row.quantity)) != (record.feature, record.quantity):
                answers[index] = _conflict(record, row.feature, int(row.quantity), 0)
            else:
                duplicate = key not in new or first[key] != index
                answers[index] = _recorded(row, record.user_id, duplicate=duplicate)
        await _add_to_rollups(database, conn, new.values())
        written = 0
        if new:
            latest = max(now for _, _, now in group)
            written = await add_to_totals(
                conn, database, host_events, policy, rows=new.values(), states=states, now=latest
            )
    USAGE_RECORDS.inc(len(new))  # committed
    if host_events is not None and written:
        host_events.notify_written()
    return [answer for answer in answers if answer is not None]  # each caller: a refusal or a record
