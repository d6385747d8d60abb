"""The running total of usage per (account, feature, quota window), `usage_window_total`: what
quota reads (`used`, `remaining`, `WithinQuota`, `access`) read, one row, instead of summing the
window.

Every record adds to the total of the window that contains its `recordedAt` (an earlier window
for a late record), in the recording's own statement or transaction, only when the record is new
(a duplicate idempotency key adds nothing). A total row is created by the first record of its
window with the window's exact sum (`exact_window_sum`: hourly rollups of the whole hours plus the
raw records of the two partial edge hours) of the records already there, so a window whose
records were written before totals existed, or under another window (the subscription's period
changed), starts exact; later records add to it, concurrent ones taking turns on the row. A
window without a row is read with that exact sum.

On PostgreSQL the single record's one statement (billing/usage/recording.py `_RECORD_ONE`) holds
the total as data-modifying CTEs after the record's (`inserted`, when it is new) and its hour's
rollup's (`added`): `total` upserts it RETURNING the new quantity; with host events,
`threshold_80` and then `threshold_100` (it reads the first, so PostgreSQL runs them in that
order) insert `usage.threshold` into the outbox when the new total, less this record, was below
the threshold and now reaches it. The Python side (batches, SQLite, limits, the same rule) is
billing/usage/thresholds.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    Integer,
    String,
    Text,
    and_,
    bindparam,
    case,
    cast,
    exists,
    func,
    literal_column,
    select,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import JSONB

from db.models import HostEventStatus, host_event_table, rollup_table, usage_table, usage_total_table

PERCENTS = (80, 100)
EVENT_TYPE = "usage.threshold"
HOUR = timedelta(hours=1)
RANGES = ("hours_from", "hours_to", "head_from", "head_to", "tail_from", "tail_to")


def hour_of(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def sum_ranges(start: datetime, end: datetime) -> dict[str, datetime]:
    """The window [start, end) as whole hours [hours_from, hours_to) read from the rollups and two
    partial edges [head_from, head_to), [tail_from, tail_to) read from raw records (empty ranges
    where there are none): always the same three parts, so the statement is compiled once."""
    first_whole = hour_of(start)
    if first_whole < start:
        first_whole += HOUR
    last_whole = hour_of(end)  # the start of the hour the window ends in
    if first_whole > last_whole:  # start and end inside one hour
        return dict(zip(RANGES, (start, start, start, end, end, end), strict=True))
    return dict(zip(RANGES, (first_whole, last_whole, start, first_whole, last_whole, end), strict=True))


def exact_window_sum(account_id: Any, feature: Any, ranges: Mapping[str, Any]) -> Any:
    """The window's usage summed from rollups and the raw records of its edges (a scalar SQL
    expression); `ranges` are `sum_ranges` values or bind parameters."""
    r, u = rollup_table.c, usage_table.c

    def raw(lo: str, hi: str) -> Any:
        return (
            select(func.coalesce(func.sum(u.quantity), 0))
            .where(
                u.account_id == account_id,
                u.feature == feature,
                u.recorded_at >= ranges[lo],
                u.recorded_at < ranges[hi],
            )
            .scalar_subquery()
        )

    hours = (
        select(func.coalesce(func.sum(r.quantity), 0))
        .where(
            r.account_id == account_id,
            r.feature == feature,
            r.hour >= ranges["hours_from"],
            r.hour < ranges["hours_to"],
        )
        .scalar_subquery()
    )
    return cast(hours + raw("head_from", "head_to") + raw("tail_from", "tail_to"), BigInteger)


def total_of(account_id: Any, feature: Any, start: Any, end: Any) -> Any:
    """The window's total row, as a scalar subquery (NULL when there is none)."""
    t = usage_total_table.c
    return (
        select(t.quantity)
        .where(t.account_id == account_id, t.feature == feature, t.window_start == start, t.window_end == end)
        .scalar_subquery()
    )


def _text(name: str) -> Any:
    return cast(bindparam(name, type_=Text), Text)


def _big(name: str) -> Any:
    return cast(bindparam(name, type_=BigInteger), BigInteger)


def _window_bound(name: str) -> Any:
    return bindparam(name, type_=usage_total_table.c.window_start.type)


def total_ctes(added: Any, *, thresholds: bool) -> list[Any]:
    """The `total` CTE (and with `thresholds` the two event CTEs) of the one-record statement.

    `added` is the rollup's upsert, RETURNING `account_id` and `feature` when the record is new:
    reading it makes PostgreSQL write the rollup before the total (CTEs run in no set order
    otherwise), the lock order of the batch path too (rollups, then totals), so the two never
    deadlock. Parameters: `window_start`, `window_end`, the `sum_ranges` of that window, `added`
    (the record's quantity); with thresholds, those of `thresholds.threshold_parameters`."""
    t = usage_total_table
    start, end = _window_bound("window_start"), _window_bound("window_end")
    a, quantity = added.c, _big("added")
    # The first record of a window: the exact sum of what is already there (this statement's own
    # writes are not visible to it), computed only when the row is missing.
    missing = ~exists().where(
        and_(
            t.c.account_id == a.account_id,
            t.c.feature == a.feature,
            t.c.window_start == start,
            t.c.window_end == end,
        )
    )
    before = case(
        (missing, exact_window_sum(a.account_id, a.feature, {name: _window_bound(name) for name in RANGES})),
        else_=0,
    )
    upsert = postgresql.insert(t).from_select(
        ["account_id", "feature", "window_start", "window_end", "quantity"],
        select(a.account_id, a.feature, start, end, quantity + before),
    )
    total = (
        upsert.on_conflict_do_update(
            index_elements=["account_id", "feature", "window_start", "window_end"],
            set_={"quantity": t.c.quantity + quantity},  # not excluded: it may hold `before`
        )
        .returning(t.c.quantity)
        .cte("total")
    )
    ctes = [total]
    if not thresholds:
        return ctes
    now = bindparam("event_now", type_=host_event_table.c.created_at.type)
    for percent in PERCENTS:
        threshold = _big(f"threshold_{percent}")
        data = func.jsonb_build_object(
            literal_column("'userId'"),
            _text("event_user_id"),
            literal_column("'feature'"),
            _text("event_feature"),
            literal_column("'percent'"),
            literal_column(str(percent)),
            literal_column("'limit'"),
            _big("event_limit"),
            literal_column("'used'"),
            total.c.quantity,
            literal_column("'windowStart'"),
            _text("window_start_iso"),
            literal_column("'windowEnd'"),
            _text("window_end_iso"),
        )
        payload = func.jsonb_build_object(
            literal_column("'type'"),
            literal_column(f"'{EVENT_TYPE}'"),
            literal_column("'timestamp'"),
            _text("timestamp_iso"),
            literal_column("'data'"),
            data,
            type_=JSONB,
        )
        query = (
            select(
                cast(bindparam(f"message_id_{percent}", type_=String), String),
                literal_column(f"'{EVENT_TYPE}'"),
                _big("event_account_id"),
                _text("event_user_id"),
                _text(f"dedupe_key_{percent}"),
                payload,
                now,
                literal_column(f"'{HostEventStatus.PENDING.value}'"),
                cast(literal_column("0"), Integer),
                now,
            )
            .select_from(total)
            .where(total.c.quantity - _big("added") < threshold, total.c.quantity >= threshold)
        )
        if len(ctes) > 1:  # after the previous threshold's insert: an account's events in order
            query = query.where(select(func.count()).select_from(ctes[-1]).scalar_subquery() >= 0)
        insert = (
            postgresql.insert(host_event_table)
            .from_select(
                [
                    "message_id",
                    "type",
                    "account_id",
                    "user_id",
                    "dedupe_key",
                    "payload",
                    "created_at",
                    "status",
                    "attempts",
                    "next_attempt_at",
                ],
                query,
            )
            .on_conflict_do_nothing(index_elements=["dedupe_key"])
            .returning(host_event_table.c.id)
            .cte(f"threshold_{percent}")
        )
        ctes.append(insert)
    return ctes
