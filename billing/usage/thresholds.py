"""`usage.threshold` host events: a record that takes a feature's usage across 80% or 100% of
its quota in a window.

A running total per (account, feature, quota window) is upserted in the recording's transaction,
one statement for the whole batch (`INSERT ... ON CONFLICT DO UPDATE quantity = quantity +
excluded.quantity RETURNING quantity`): the new total, less what this batch added, is the old
one. The upsert locks the total's row until the commit, so concurrent recordings see each
other's totals one after the other and exactly one of them crosses each threshold; the event's
dedupe key (account, feature, window start, percent) makes that once per window for sure.
The window is never summed. Totals start when host events are turned on: usage recorded before
that in the current window is not in them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

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
from billing.usage.window_totals import PERCENTS
from billing.usage.windows import feature_limit, quota_window
from db.engine import Database
from db.models import usage_total_table


def _upsert(insert: Any) -> Any:
    statement = insert(usage_total_table)
    return statement.on_conflict_do_update(
        index_elements=["account_id", "feature", "window_start"],
        set_={"quantity": usage_total_table.c.quantity + statement.excluded.quantity},
    ).returning(
        usage_total_table.c.account_id,
        usage_total_table.c.feature,
        usage_total_table.c.window_start,
        usage_total_table.c.quantity,
    )


_UPSERT = {"postgresql": _upsert(postgresql.insert), "sqlite": _upsert(sqlite.insert)}


def one_record_parameters(
    config: HostEventConfig,
    policy: AccessPolicy,
    state: SubscriptionState,
    record: Any,
    at: datetime,
    now: datetime,
) -> dict[str, Any] | None:
    """The parameters of the one-statement recording with its window total and threshold events
    (billing/usage/window_totals.py); None when the feature has no limit or the events are off."""
    if not config.wants(USAGE_THRESHOLD) or state.account_id is None:
        return None
    limit = feature_limit(policy, state, record.feature, now)
    if not limit:
        return None
    window = quota_window(state, at)
    values: dict[str, Any] = {
        "window_start": window.start,
        "window_end": window.end,
        "window_start_iso": _iso(window.start),
        "window_end_iso": _iso(window.end),
        "timestamp_iso": _iso(now),
        "event_now": now,
        "event_account_id": state.account_id,
        "event_user_id": state.user_id,
        "event_feature": record.feature,
        "event_limit": limit,
        "added": record.quantity,
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
    config: HostEventConfig,
    policy: AccessPolicy,
    *,
    rows: Iterable[Any],
    states: Mapping[int, SubscriptionState],
    now: datetime,
) -> int:
    """Add newly inserted usage rows to their window totals; write the threshold events they
    cross. Returns how many events were written. Only features with a positive limit count."""
    if not config.wants(USAGE_THRESHOLD):
        return 0
    sums: dict[tuple[int, str, datetime], int] = {}
    limits: dict[tuple[int, str, datetime], tuple[int, datetime]] = {}
    for row in rows:
        state = states.get(row.account_id)
        if state is None:
            continue
        limit = feature_limit(policy, state, row.feature, now)
        if not limit:
            continue
        window = quota_window(state, row.recorded_at)
        key = (row.account_id, row.feature, window.start)
        sums[key] = sums.get(key, 0) + int(row.quantity)
        limits[key] = (limit, window.end)
    if not sums:
        return 0
    totals = await conn.execute(
        _UPSERT[database.engine.dialect.name],
        [
            {
                "account_id": account_id,
                "feature": feature,
                "window_start": start,
                "window_end": limits[(account_id, feature, start)][1],
                "quantity": quantity,
            }
            for (account_id, feature, start), quantity in sorted(sums.items())  # one lock order
        ],
    )
    written = 0
    for total in totals.all():
        key = (total.account_id, total.feature, _utc(total.window_start))
        if key not in sums:
            continue
        new = int(total.quantity)
        old = new - sums[key]
        limit, end = limits[key]
        events = [
            PendingHostEvent(
                USAGE_THRESHOLD,
                {
                    "userId": states[total.account_id].user_id,
                    "feature": total.feature,
                    "percent": percent,
                    "limit": limit,
                    "used": new,
                    "windowStart": _iso(key[2]),
                    "windowEnd": _iso(end),
                },
                dedupe_key(total.account_id, total.feature, key[2], percent),
            )
            for percent in crossed(old, new, limit)
        ]
        if events:
            written += await insert_events(
                conn,
                database,
                events,
                account_id=total.account_id,
                user_id=states[total.account_id].user_id,
                now=now,
            )
    return written


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
