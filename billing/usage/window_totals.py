"""The running window total and `usage.threshold` events inside the one-statement recording of a
single record on PostgreSQL (billing/usage/recording.py `_RECORD_ONE`), so that turning host
events on keeps that path at two round trips.

Added to the statement as data-modifying CTEs after `inserted` (the record, when it is new):
`total` upserts the window total RETURNING the new quantity; `threshold_80` and then
`threshold_100` (it reads the first, so PostgreSQL runs them in that order) insert the event into
the outbox when the new total, less this record, was below the threshold and now reaches it. The
Python side (limits, windows, the same rule) is billing/usage/thresholds.py.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, Integer, String, Text, bindparam, cast, func, literal_column, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import JSONB

from db.models import HostEventStatus, host_event_table, usage_total_table

PERCENTS = (80, 100)
EVENT_TYPE = "usage.threshold"


def _text(name: str) -> Any:
    return cast(bindparam(name, type_=Text), Text)


def _big(name: str) -> Any:
    return cast(bindparam(name, type_=BigInteger), BigInteger)


def total_and_threshold_ctes(inserted: Any) -> list[Any]:
    t = usage_total_table
    upsert = postgresql.insert(t).from_select(
        ["account_id", "feature", "window_start", "window_end", "quantity"],
        select(
            inserted.c.account_id,
            inserted.c.feature,
            bindparam("window_start", type_=t.c.window_start.type),
            bindparam("window_end", type_=t.c.window_end.type),
            inserted.c.quantity,
        ),
    )
    total = (
        upsert.on_conflict_do_update(
            index_elements=["account_id", "feature", "window_start"],
            set_={"quantity": t.c.quantity + upsert.excluded.quantity},
        )
        .returning(t.c.quantity)
        .cte("total")
    )
    ctes = [total]
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
