"""The running window totals of a recording (billing/usage/window_totals.py), and the
`usage.threshold` host events: a record that takes a feature's usage across 80% or 100% of its
quota in a window.

For a batch (and every recording on SQLite), two statements in the recording's transaction: the
creation of the windows' missing rows with their exact sums less this batch, then one upsert
for all of them (`INSERT ... ON CONFLICT DO UPDATE quantity = quantity + excluded.quantity
RETURNING quantity`): the new total, less what this batch added, is the old one. The upsert
locks the total's row until the commit, so concurrent recordings see each other's totals one
after the other and exactly one of them crosses each threshold; the event's dedupe key
(account, feature, window start, percent) makes that once per window for sure.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import BigInteger, String, bindparam, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from billing.access import AccessPolicy, SubscriptionState
from billing.host_events.events import (
    USAGE_THRESHOLD,
    HostEventConfig,
    PendingHostEvent,
    insert_events,
    new_message_id,
)
from billing.usage.window_totals import PERCENTS, RANGES, exact_window_sum, sum_ranges, total_of
from billing.usage.windows import feature_limit, quota_window
from db.engine import Database
from db.models import usage_total_table


def _create(insert: Any) -> Any:
    """A window's first total: the exact sum of its records, this transaction's included, less
    what this transaction adds (the upsert that follows adds it); skipped when the row exists."""
    t = usage_total_table.c
    ranges = {name: bindparam(name, type_=t.window_start.type) for name in RANGES}
    account, feature = bindparam("account_id", type_=t.account_id.type), bindparam("feature", type_=String)
    start, end = (
        bindparam("window_start", type_=t.window_start.type),
        bindparam("window_end", type_=t.window_end.type),
    )
    before = exact_window_sum(account, feature, ranges) - bindparam("quantity", type_=BigInteger)
    return (
        insert(usage_total_table)
        .from_select(
            ["account_id", "feature", "window_start", "window_end", "quantity"],
            select(account, feature, start, end, before).where(
                total_of(account, feature, start, end).is_(None)
            ),
        )
        .on_conflict_do_nothing(index_elements=["account_id", "feature", "window_start", "window_end"])
    )


def _upsert(insert: Any) -> Any:
    statement = insert(usage_total_table)
    return statement.on_conflict_do_update(
        index_elements=["account_id", "feature", "window_start", "window_end"],
        set_={"quantity": usage_total_table.c.quantity + statement.excluded.quantity},
    ).returning(
        usage_total_table.c.account_id,
        usage_total_table.c.feature,
        usage_total_table.c.window_start,
        usage_total_table.c.window_end,
        usage_total_table.c.quantity,
    )


KEY = ("account_id", "feature", "window_start", "window_end")
_CREATE = {"postgresql": _create(postgresql.insert), "sqlite": _create(sqlite.insert)}
_UPSERT = {"postgresql": _upsert(postgresql.insert), "sqlite": _upsert(sqlite.insert)}


def one_record_parameters(state: SubscriptionState, record: Any, at: datetime) -> dict[str, Any]:
    """The window total's parameters of the one-statement recording (billing/usage/
    window_totals.py `total_ctes`): the window that contains `at`."""
    window = quota_window(state, at)
    return {
        "window_start": window.start,
        "window_end": window.end,
        "added": record.quantity,
        **sum_ranges(window.start, window.end),
    }


def threshold_parameters(
    config: HostEventConfig | None,
    policy: AccessPolicy,
    state: SubscriptionState,
    record: Any,
    at: datetime,
    now: datetime,
) -> dict[str, Any] | None:
    """The parameters of the one-statement recording's threshold events; None when the feature
    has no limit or the events are off."""
    if config is None or not config.wants(USAGE_THRESHOLD) or state.account_id is None:
        return None
    limit = feature_limit(policy, state, record.feature, now)
    if not limit:
        return None
    window = quota_window(state, at)
    values: dict[str, Any] = {
        "window_start_iso": _iso(window.start),
        "window_end_iso": _iso(window.end),
        "timestamp_iso": _iso(now),
        "event_now": now,
        "event_account_id": state.account_id,
        "event_user_id": state.user_id,
        "event_feature": record.feature,
        "event_limit": limit,
    }
    for percent in PERCENTS:
        values[f"threshold_{percent}"] = math.ceil(limit * percent / 100)
        values[f"message_id_{percent}"] = new_message_id()
        values[f"dedupe_key_{percent}"] = dedupe_key(state.account_id, record.feature, window.start, percent)
    return values


def dedupe_key(account_id: int, feature: str, window_start: datetime, percent: int) -> str:
    return f"{USAGE_THRESHOLD}:{account_id}:{feature}:{window_start.isoformat()}:{percent}"


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def crossed(old: int, new: int, limit: int) -> list[int]:
    """The percents of `limit` that `old` -> `new` reaches for the first time."""
    return [percent for percent in PERCENTS if old < math.ceil(limit * percent / 100) <= new]


async def add_to_totals(
    conn: AsyncConnection,
    database: Database,
    config: HostEventConfig | None,
    policy: AccessPolicy,
    *,
    rows: Iterable[Any],
    states: Mapping[int, SubscriptionState],
    now: datetime,
) -> int:
    """Add newly inserted usage rows to their window totals (after their insert and rollups, in
    the same transaction); with host events, write the threshold events they cross (features
    with a positive limit). Returns how many events were written."""
    sums: dict[tuple[int, str, datetime, datetime], int] = {}
    for row in rows:
        window = quota_window(states[row.account_id], row.recorded_at)
        key = (row.account_id, row.feature, window.start, window.end)
        sums[key] = sums.get(key, 0) + int(row.quantity)
    if not sums:
        return 0
    dialect = database.engine.dialect.name
    keys = sorted(sums)  # one lock order
    parameters = [{**dict(zip(KEY, key, strict=True)), "quantity": sums[key]} for key in keys]
    created = [{**p, **sum_ranges(key[2], key[3])} for p, key in zip(parameters, keys, strict=True)]
    await conn.execute(_CREATE[dialect], created)
    totals = (await conn.execute(_UPSERT[dialect], parameters)).all()
    if config is None or not config.wants(USAGE_THRESHOLD):
        return 0
    written = 0
    for total in totals:
        key = (total.account_id, total.feature, _utc(total.window_start), _utc(total.window_end))
        state = states[total.account_id]
        limit = feature_limit(policy, state, total.feature, now)
        if key not in sums or not limit:
            continue
        new = int(total.quantity)
        old = new - sums[key]
        events = [
            PendingHostEvent(
                USAGE_THRESHOLD,
                {
                    "userId": state.user_id,
                    "feature": total.feature,
                    "percent": percent,
                    "limit": limit,
                    "used": new,
                    "windowStart": _iso(key[2]),
                    "windowEnd": _iso(key[3]),
                },
                dedupe_key(total.account_id, total.feature, key[2], percent),
            )
            for percent in crossed(old, new, limit)
        ]
        if events:
            written += await insert_events(
                conn, database, events, account_id=total.account_id, user_id=state.user_id, now=now
            )
    return written


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
