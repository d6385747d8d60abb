"""Request budgets per key (e.g. one user's calls that reach Stripe), shared by every process.

The counter lives in the service's database, so every `billing serve` process and worker sees
the same budget with no other infrastructure: the `rate_limit` table holds one row per key (its
window's start and the hits in it). A hit is a single statement,

    INSERT INTO rate_limit (bucket, window_start, hits) VALUES (:key, :now, 1)
    ON CONFLICT (bucket) DO UPDATE SET
      hits = CASE WHEN rate_limit.window_start > :now - period THEN rate_limit.hits + 1 ELSE 1 END,
      window_start = CASE WHEN ... THEN rate_limit.window_start ELSE :now END
    RETURNING hits, window_start

which PostgreSQL and SQLite both run atomically (the row lock, or SQLite's single writer), so
concurrent hits from several processes are all counted. It is a fixed window that starts at a
key's first hit: at most `limit` hits per window; the next one is refused until the window ends
(`retry_after`). Refused hits count too, so hammering does not shorten the wait. At a window's
edge a caller may get up to twice the limit within a short time, which is fine for protecting an
upstream quota. A key keeps one row, overwritten as windows pass.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import case
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from billing.clock import Clock, utcnow
from billing.errors import BillingError, ErrorCode
from db.engine import Database
from db.models import rate_limit_table

UNITS: dict[str, int] = {
    "s": 1,
    "sec": 1,
    "second": 1,
    "m": 60,
    "min": 60,
    "minute": 60,
    "h": 3600,
    "hour": 3600,
    "d": 86400,
    "day": 86400,
}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*([a-z]+?)s?\s*$")
OFF = {"off", "none", "unlimited"}
MAX_KEY_LENGTH = 320


@dataclass(frozen=True, slots=True)
class Rate:
    """At most `limit` hits per `period`."""

    limit: int
    period: timedelta

    @classmethod
    def parse(cls, text: str) -> Rate | None:
        """ "10/minute", "100/hour", "5/30s", "1000/day"; None for "off"."""
        if text.strip().lower() in OFF:
            return None
        match = _RATE.match(text.lower())
        unit = UNITS.get(match.group(3)) if match else None
        if match is None or unit is None:
            raise ValueError(
                f"{text!r} is not a rate: use N/second, N/minute, N/hour, N/day (or N/30s), or off"
            )
        limit, count = int(match.group(1)), int(match.group(2) or 1)
        if limit < 1 or count < 1:
            raise ValueError(f"{text!r}: the count and the period must be at least 1")
        return cls(limit=limit, period=timedelta(seconds=unit * count))

    def __str__(self) -> str:
        seconds = int(self.period.total_seconds())
        for name, size in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
            if seconds == size:
                return f"{self.limit}/{name}"
        return f"{self.limit}/{seconds}s"


@dataclass(frozen=True, slots=True)
class RateDecision:
    allowed: bool
    hits: int  # in the current window, this one included
    limit: int
    resets_at: datetime  # when the current window ends

    def retry_after(self, now: datetime) -> int:
        """Whole seconds until the window ends (at least 1)."""
        return max(1, math.ceil((self.resets_at - now).total_seconds()))


class RateLimiter:
    """Counts hits per key in the database; see the module docstring for the algorithm."""

    def __init__(self, database: Database, *, clock: Clock = utcnow) -> None:
        self.database = database
        self.clock = clock

    async def hit(self, key: str, rate: Rate) -> RateDecision:
        """Count one hit of `key` and say whether it is within `rate`."""
        if not key or len(key) > MAX_KEY_LENGTH:
            raise ValueError(f"a rate-limit key is 1 to {MAX_KEY_LENGTH} characters")
        now = self.clock()
        table = rate_limit_table
        insert = pg_insert if self.database.is_postgres else sqlite_insert
        values = insert(table).values(bucket=key, window_start=now, hits=1)
        current = table.c.window_start > now - rate.period
        statement = values.on_conflict_do_update(
            index_elements=[table.c.bucket],
            set_={
                "hits": case((current, table.c.hits + 1), else_=1),
                "window_start": case((current, table.c.window_start), else_=values.excluded.window_start),
            },
        ).returning(table.c.hits, table.c.window_start)
        async with self.database.write() as conn:
            hits, window_start = (await conn.execute(statement)).one()
        return RateDecision(
            allowed=hits <= rate.limit, hits=hits, limit=rate.limit, resets_at=window_start + rate.period
        )

    async def check(self, key: str, rate: Rate, *, what: str = "requests") -> RateDecision:
        """`hit`, raising RATE_LIMITED (with `retryAfter` in seconds) beyond the rate."""
        decision = await self.hit(key, rate)
        if not decision.allowed:
            retry_after = decision.retry_after(self.clock())
            raise BillingError(
                f"too many {what}: at most {rate}; try again in {retry_after} s",
                code=ErrorCode.RATE_LIMITED,
                retryAfter=retry_after,
            )
        return decision
