"""Property: concurrent usage batches with repeated idempotency keys leave exact totals.

Hypothesis generates a few batches of usage records for two users and two features, with
idempotency keys drawn from a small pool (so keys repeat within a batch and across batches,
sometimes for the same use, sometimes for another), and times spread over a few hours. The
batches are recorded at once: `asyncio.gather` of `record_usage` (the Python function host apps
embed), and of `recordUsageBatch` over GraphQL with the service key; on PostgreSQL (really
concurrent) and SQLite (writers queued). Whatever order the database ran them in:

- a batch either records all of its items or fails with IDEMPOTENCY_CONFLICT and writes none;
- a batch fails only for a real conflict: one of its keys repeated with another feature or
  quantity, in the batch itself or stored for that user by a batch that succeeded;
- a batch whose keys never meet another use of the same key always succeeds;
- every stored record is an item of a successful batch, and every key of a successful batch
  is stored once (one answer per stored record says `duplicate: false`, with its id);
- the stored totals per user and feature equal the model's (each key counted once), and the
  hourly rollups equal the raw records summed by hour.

Every example starts from empty tables (`truncate_all`, as the `database` fixture does).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from billing.errors import BillingError, ErrorCode
from billing.plans import load_catalog
from billing.usage import UsageInput, hour_of, record_usage
from db.engine import Database
from db.models import account_table, rollup_table, usage_table
from tests.conftest import truncate_all
from tests.graphql_support import SERVICE_KEY, Api, insert_account, serve_api

CATALOG = load_catalog()
NOW = datetime.now(UTC).replace(microsecond=0)  # (the GraphQL path checks times against the real clock)
USERS = ("ada", "bob")
FEATURES = ("api_calls", "storage_gb")
Use = tuple[str, int]  # (feature, quantity): what a key stands for
BATCH = """mutation($inputs: [RecordUsageInput!]!) {
  recordUsageBatch(inputs: $inputs) { id userId feature quantity recordedAt idempotencyKey duplicate }
}"""


@dataclass(frozen=True)
class Item:
    user: str
    key: str
    feature: str
    quantity: int
    minutes_ago: int

    @property
    def at(self) -> datetime:
        return NOW - timedelta(minutes=self.minutes_ago)

    def usage(self) -> UsageInput:
        return UsageInput(self.user, self.feature, self.quantity, self.key, self.at)

    @property
    def use(self) -> Use:
        return (self.feature, self.quantity)


items = st.builds(
    Item,
    user=st.sampled_from(USERS),
    key=st.sampled_from([f"k{n}" for n in range(6)]),
    feature=st.sampled_from(FEATURES),
    quantity=st.integers(1, 3),
    minutes_ago=st.integers(0, 150),  # across three or four hours
)
batches = st.lists(st.lists(items, min_size=1, max_size=6), min_size=1, max_size=5)


def conflicts_within(batch: list[Item]) -> bool:
    first: dict[tuple[str, str], Use] = {}
    return any(first.setdefault((item.user, item.key), item.use) != item.use for item in batch)


async def stored(database: Database) -> tuple[dict[tuple[str, str], Any], list[Any]]:
    async with database.read() as conn:
        records = await conn.execute(
            select(
                account_table.c.user_id,
                usage_table.c.id,
                usage_table.c.idempotency_key,
                usage_table.c.feature,
                usage_table.c.quantity,
                usage_table.c.recorded_at,
            ).join(account_table, account_table.c.id == usage_table.c.account_id)
        )
        by_key = {(row.user_id, row.idempotency_key): row for row in records}
        rollups = list(
            await conn.execute(
                select(
                    account_table.c.user_id,
                    rollup_table.c.feature,
                    rollup_table.c.hour,
                    rollup_table.c.quantity,
                )
                .join(account_table, account_table.c.id == rollup_table.c.account_id)
                .where(rollup_table.c.quantity != 0)
            )
        )
    return by_key, rollups


@dataclass(frozen=True)
class Answer:
    """One answered item, from either way of recording."""

    id: int
    user_id: str
    feature: str
    quantity: int
    idempotency_key: str
    recorded_at: datetime
    duplicate: bool


Outcome = list[Answer] | str  # the answers, or the error code of a refused batch


async def record_in_python(database: Database, batch: list[Item]) -> Outcome:
    try:
        results = await record_usage(
            database=database, catalog=CATALOG, records=[item.usage() for item in batch], now=NOW
        )
    except BillingError as exc:
        return exc.code.value
    return [
        Answer(r.id, r.user_id, r.feature, r.quantity, r.idempotency_key, r.recorded_at, r.duplicate)
        for r in results
    ]


async def record_over_graphql(api: Api, batch: list[Item]) -> Outcome:
    inputs = [
        {
            "userId": item.user,
            "feature": item.feature,
            "quantity": item.quantity,
            "idempotencyKey": item.key,
            "recordedAt": item.at.isoformat(),
        }
        for item in batch
    ]
    result = await api.query(BATCH, {"inputs": inputs}, token=SERVICE_KEY)
    if result.get("errors"):
        (error,) = result["errors"]
        assert result["data"] is None
        return str(error["extensions"]["code"])
    return [
        Answer(
            int(r["id"]),
            r["userId"],
            r["feature"],
            r["quantity"],
            r["idempotencyKey"],
            datetime.fromisoformat(r["recordedAt"]),
            r["duplicate"],
        )
        for r in result["data"]["recordUsageBatch"]
    ]


async def check_each_use_recorded_once(
    database: Database, generated: list[list[Item]], outcomes: list[Outcome]
) -> None:
    records, rollups = await stored(database)

    succeeded = [
        (batch, out) for batch, out in zip(generated, outcomes, strict=True) if isinstance(out, list)
    ]
    failed = [(batch, out) for batch, out in zip(generated, outcomes, strict=True) if isinstance(out, str)]

    # All or nothing, and only for a real conflict.
    for batch, error in failed:
        assert error == ErrorCode.IDEMPOTENCY_CONFLICT.value, (batch, error)
        assert conflicts_within(batch) or any(
            (item.user, item.key) in records
            and (records[(item.user, item.key)].feature, records[(item.user, item.key)].quantity) != item.use
            for item in batch
        ), batch
    uses: dict[tuple[str, str], set[Use]] = {}
    for batch in generated:
        for item in batch:
            uses.setdefault((item.user, item.key), set()).add(item.use)
    for batch, outcome in zip(generated, outcomes, strict=True):
        if all(len(uses[(item.user, item.key)]) == 1 for item in batch):
            assert isinstance(outcome, list), (batch, outcome)

    # Every stored record belongs to a successful batch; every key of one is stored once.
    model: dict[tuple[str, str], Use] = {}
    for batch, results in succeeded:
        assert [(r.feature, r.quantity, r.idempotency_key) for r in results] == [
            (item.feature, item.quantity, item.key) for item in batch
        ]
        for item, result in zip(batch, results, strict=True):
            assert model.setdefault((item.user, item.key), item.use) == item.use
            row = records[(item.user, item.key)]
            assert (result.id, result.recorded_at) == (row.id, row.recorded_at)
    assert {key: (row.feature, int(row.quantity)) for key, row in records.items()} == model
    firsts = Counter(
        (r.user_id, r.idempotency_key) for _, results in succeeded for r in results if not r.duplicate
    )
    assert firsts == Counter(dict.fromkeys(records, 1))

    # Totals: each key once; rollups are the raw records by hour.
    totals: Counter[tuple[str, str]] = Counter()
    for (user, _), (feature, quantity) in model.items():
        totals[(user, feature)] += quantity
    stored_totals: Counter[tuple[str, str]] = Counter()
    by_hour: Counter[tuple[str, str, datetime]] = Counter()
    for (user, _), row in records.items():
        stored_totals[(user, row.feature)] += int(row.quantity)
        by_hour[(user, row.feature, hour_of(row.recorded_at))] += int(row.quantity)
    assert stored_totals == totals
    assert Counter({(r.user_id, r.feature, hour_of(r.hour)): int(r.quantity) for r in rollups}) == by_hour


async def start(database: Database) -> None:
    await truncate_all(database)  # each example starts from empty tables
    await insert_account(database, "ada", tier="starter")
    await insert_account(database, "bob", tier="pro")


EXAMPLES = settings(
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@settings(EXAMPLES, max_examples=100)
@given(generated=batches)
async def test_concurrent_record_usage_calls_record_each_use_exactly_once(
    database: Database, generated: list[list[Item]]
) -> None:
    await start(database)
    outcomes = await asyncio.gather(*(record_in_python(database, batch) for batch in generated))
    await check_each_use_recorded_once(database, generated, list(outcomes))


@pytest.fixture
async def api(database: Database) -> AsyncIterator[Api]:
    async with serve_api(database, service_api_key=SERVICE_KEY, usage_reporter=False) as served:
        yield served


@settings(EXAMPLES, max_examples=30)
@given(generated=batches)
async def test_concurrent_record_usage_batch_mutations_record_each_use_exactly_once(
    database: Database, api: Api, generated: list[list[Item]]
) -> None:
    await start(database)
    outcomes = await asyncio.gather(*(record_over_graphql(api, batch) for batch in generated))
    await check_each_use_recorded_once(database, generated, list(outcomes))
