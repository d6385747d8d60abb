"""GraphQL abuse limits: depth, aliases, tokens and cost, fragments counted once, answered fast.

Every hostile query is sent to the served app and must be refused within `FAST` seconds (a guard
against the fragment re-expansion of the stock limiters, not a benchmark), before any resolver
runs, with `extensions.code` QUERY_TOO_COMPLEX.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import httpx
import strawberry
from graphql import get_introspection_query, parse
from httpx_ws import aconnect_ws
from sqlalchemy import insert
from strawberry.tools import merge_types

from db.engine import Database
from db.models import invoice_table
from graph.limits import QUERY_TOO_COMPLEX, QueryLimits, measure, violations
from graph.schema import Query as BillingQuery
from graph.schema import build_schema
from tests.graphql_support import error_codes, hs256_token, insert_account, only_error, serve_api

FAST = 1.0  # seconds: each hostile query is answered within this
T = TypeVar("T")
INTROSPECTION = get_introspection_query(
    descriptions=True,
    specified_by_url=True,
    directive_is_repeatable=True,
    schema_description=True,
    input_value_deprecation=True,
)


async def fast(awaitable: Awaitable[T]) -> T:
    return await asyncio.wait_for(awaitable, FAST)


CALLS: list[str] = []


@strawberry.type
class Counted:
    @strawberry.field
    def counted(self) -> int:
        CALLS.append("counted")
        return len(CALLS)


COUNTED_SCHEMA = build_schema(merge_types("Query", (BillingQuery, Counted)))


def refusal(result: dict[str, Any], limit: str) -> dict[str, Any]:
    error = only_error(result)
    assert error["extensions"]["code"] == QUERY_TOO_COMPLEX, result
    assert error["extensions"]["limit"] == limit, result
    assert result.get("data") is None
    return error


def nested(levels: int, leaf: str = "name") -> str:
    """`ofType { ... }` nested `levels` times around `leaf`."""
    return "ofType { " * levels + leaf + " }" * levels


def doubling(levels: int, leaf: str = "plans { id }", extra: str = "") -> str:
    """F0 spreads F1 twice, F1 spreads F2 twice ...: 2**levels copies of the leaf when expanded."""
    fragments = "".join(
        f"fragment F{i} on Query {{ {extra.format(i=i)} ...F{i + 1} ...F{i + 1} }}\n" for i in range(levels)
    )
    return f"query Bomb {{ ...F0 }}\n{fragments}fragment F{levels} on Query {{ {leaf} }}"


# Measuring, without a server --------------------------------------------------------------------


def test_fragments_are_measured_once_and_combined_where_spread() -> None:
    metrics = {getattr(node.name, "value", None): m for node, m in measure(parse(doubling(40)))}
    assert metrics["F40"].cost == 2 and metrics["F39"].cost == 4
    assert metrics["Bomb"].cost == 2**31 - 1  # 2 * 2**40 fields, saturated
    assert metrics["Bomb"].depth == 2 and metrics["Bomb"].aliases == 0
    aliased = {
        getattr(node.name, "value", None): m
        for node, m in measure(parse(doubling(3, extra="a{i}: __typename")))
    }
    assert aliased["Bomb"].aliases == 1 + 2 + 4  # F0 once, F1 twice, F2 four times


def test_depth_counts_through_fragments_and_introspection() -> None:
    document = parse(
        "{ __schema { types { ...T } } } fragment T on __Type { fields { type { ...R } } } "
        "fragment R on __Type { ofType { ofType { name } } }"
    )
    operation = measure(document)[0][1]
    assert operation.depth == 7  # __schema types fields type ofType ofType name


def test_page_sizes_multiply_the_cost() -> None:
    def cost(query: str) -> int:
        return measure(parse(query))[0][1].cost

    assert cost("{ viewer { invoices { id total } } }") == 1 + 1 + 2
    assert cost("{ viewer { invoices(first: 20) { id total } } }") == 1 + 1 + 40
    assert cost("{ viewer { invoices(first: 5000) { id } } }") == 1 + 1 + 100  # at most a full page
    assert cost("query($n: Int) { viewer { invoices(first: $n) { id } } }") == 1 + 1 + 100


def test_the_standard_introspection_query_is_within_the_default_limits() -> None:
    assert violations(parse(INTROSPECTION), QueryLimits()) == []
    assert max(metrics.depth for _node, metrics in measure(parse(INTROSPECTION))) == 15


# Refused over HTTP, fast, before any resolver ------------------------------------------------------


async def test_the_introspection_query_and_ordinary_queries_pass(db: Database) -> None:
    async with serve_api(db) as api:
        introspection = await fast(api.query(INTROSPECTION))
        plans = await fast(api.query("{ plans { id limits { feature limit } } }"))
    assert "errors" not in introspection and introspection["data"]["__schema"]["queryType"]["name"] == "Query"
    assert "errors" not in plans and len(plans["data"]["plans"]) == 4


async def test_a_deep_query_is_refused(db: Database) -> None:
    within = '{ __type(name: "Query") { fields { type { ' + nested(11) + " } } } }"  # 15 deep
    deep = '{ __type(name: "Query") { fields { type { ' + nested(12) + " } } } }"  # 16 deep
    async with serve_api(db) as api:
        allowed = await fast(api.query(within))
        refused = await fast(api.query(deep))
    assert "errors" not in allowed, allowed
    error = refusal(refused, "depth")
    assert error["extensions"]["maximum"] == 15
    assert error["message"] == (
        "The query is nested 16 levels deep (fragments included); at most 15 are allowed."
    )


async def test_depth_through_a_chain_of_fragments_is_refused(db: Database) -> None:
    chain = "".join(f"fragment D{i} on __Type {{ ofType {{ ...D{i + 1} }} }} " for i in range(20))
    query = '{ __type(name: "Query") { ...D0 } } ' + chain + "fragment D20 on __Type { name }"
    async with serve_api(db) as api:
        result = await fast(api.query(query))
    assert "22 levels deep" in refusal(result, "depth")["message"]


async def test_deep_introspection_is_refused(db: Database) -> None:
    query = "{ __schema { types { fields { type { " + nested(30) + " } } } } }"
    async with serve_api(db) as api:
        result = await fast(api.query(query))
    refusal(result, "depth")


async def test_a_document_nested_beyond_the_parser_is_too_complex(db: Database) -> None:
    query = "{ __schema { types { fields { type { " + nested(250) + " } } } } }"
    async with serve_api(db, graphql_max_tokens=5000) as api:
        result = await fast(api.query(query))
    refusal(result, "depth")


async def test_an_alias_bomb_is_refused_before_any_resolver_runs(db: Database) -> None:
    CALLS.clear()
    thirty = "{ " + " ".join(f"a{i}: counted" for i in range(30)) + " }"
    bomb = "{ " + " ".join(f"a{i}: counted" for i in range(300)) + " }"
    async with serve_api(db, schema=COUNTED_SCHEMA) as api:
        refused = await fast(api.query(bomb))
        assert CALLS == []  # no resolver ran
        allowed = await fast(api.query(thirty))
    error = refusal(refused, "aliases")
    assert error["extensions"]["maximum"] == 30
    assert error["message"].startswith("The query uses 300 aliases")
    assert "errors" not in allowed and len(CALLS) == 30


async def test_doubling_fragment_spreads_are_refused_fast(db: Database) -> None:
    bomb = doubling(60)  # about 2 KB, 2**61 fields when expanded
    assert len(bomb) < 2500
    CALLS.clear()
    async with serve_api(db, schema=COUNTED_SCHEMA) as api:
        plain = await fast(api.query(bomb))
        aliased = await fast(api.query(doubling(40, leaf="counted", extra="a{i}: counted")))
        small = await fast(api.query(doubling(4, leaf="counted")))  # 16 copies of one field: fine
    refusal(plain, "cost")
    assert [error["extensions"]["limit"] for error in aliased["errors"]] == ["aliases", "cost"]
    assert set(error_codes(aliased)) == {QUERY_TOO_COMPLEX}
    assert small == {"data": {"counted": 1}}  # merged into one field, resolved once
    assert CALLS == ["counted"]


async def test_fragment_cycles_are_reported_fast(db: Database) -> None:
    cycle = "query { ...A } fragment A on Query { plans { id } ...B } fragment B on Query { ...A }"
    doubling_cycle = (
        "query { ...A } fragment A on Query { ...B ...B plans { id } } fragment B on Query { ...A ...A }"
    )
    async with serve_api(db) as api:
        results = [await fast(api.query(query)) for query in (cycle, doubling_cycle)]
    for result in results:  # the doubling cycle is reported once per spread that closes it
        assert result["data"] is None and 1 <= len(result["errors"]) <= 2
        for error in result["errors"]:
            assert error["extensions"]["code"] == "GRAPHQL_VALIDATION_FAILED"
            assert error["message"] == "Cannot spread fragment 'A' within itself via 'B'."


async def test_a_token_flood_is_refused_by_the_parser(db: Database) -> None:
    fields = "{ " + "plans { id } " * 300 + "}"  # 1 202 tokens
    comments = "{ plans { id } }" + "\n#" * 5000
    async with serve_api(db) as api:
        flood = await fast(api.query(fields))
        commented = await fast(api.query(comments))
        variables = await fast(api.post(fields, {"x": 1}))
    error = refusal(flood, "tokens")
    assert error["message"] == "The query has more than 1000 tokens; at most 1000 are allowed."
    assert error["extensions"] == {"code": QUERY_TOO_COMPLEX, "limit": "tokens", "maximum": 1000}
    refusal(commented, "tokens")
    refusal(variables.json(), "tokens")


async def test_a_costly_query_is_refused(db: Database) -> None:
    invoices = "invoices(first: 100) { id number status total amountDue amountPaid currency created }"
    seven = "{ viewer { " + " ".join(f"p{i}: {invoices}" for i in range(7)) + " } }"  # 1 + 7 * 801
    one = "query($n: Int) { viewer { invoices(first: $n) { id total } } }"
    async with serve_api(db) as api:
        refused = await fast(api.query(seven, token=hs256_token("costly")))
        allowed = await fast(api.query(one, {"n": 100}, token=hs256_token("costly")))
    error = refusal(refused, "cost")
    assert error["message"].startswith("The query costs 5,608 ")
    assert allowed == {"data": {"viewer": {"invoices": []}}}


async def test_the_limits_follow_the_settings(db: Database) -> None:
    async with serve_api(
        db, graphql_max_depth=3, graphql_max_aliases=1, graphql_max_tokens=20, graphql_max_cost=4
    ) as api:
        depth = await api.query("{ plans { limits { feature } } } ")
        too_deep = await api.query("{ __schema { types { fields { name } } } }")
        aliases = await api.query("{ a: plans { id } b: plans { id } }")
        tokens = await api.query("{ plans { id } plans { id } plans { id } plans { id } plans { id } }")
        cost = await api.query("{ plans { id name amount currency } }")
    assert "errors" not in depth
    assert refusal(too_deep, "depth")["extensions"]["maximum"] == 3
    assert refusal(aliases, "aliases")["extensions"]["maximum"] == 1
    assert refusal(tokens, "tokens")["extensions"]["maximum"] == 20
    assert refusal(cost, "cost")["extensions"]["maximum"] == 4


async def test_a_query_is_checked_once_per_exact_text_and_a_refusal_stays_a_refusal(db: Database) -> None:
    """The view keeps each query text's verdict (graph.view.OperationRules): a text that differs
    by one alias, or only by a comment, gets its own, and a refused text is refused again on
    every request, before any resolver runs."""
    CALLS.clear()
    thirty = "{ " + " ".join(f"a{i}: counted" for i in range(30)) + " }"
    thirty_one = "{ " + " ".join(f"a{i}: counted" for i in range(31)) + " }"
    commented = thirty + " # the same operation"
    async with serve_api(db, schema=COUNTED_SCHEMA) as api:
        first = await fast(api.query(thirty))
        refused = [await fast(api.query(thirty_one)) for _ in range(2)]
        again = await fast(api.query(thirty))
        with_comment = await fast(api.query(commented))
        verdicts = api.app.graphql_websocket.rules.verdicts
    for allowed in (first, again, with_comment):
        assert "errors" not in allowed and len(allowed["data"]) == 30, allowed
    for result in refused:
        assert refusal(result, "aliases")["message"].startswith("The query uses 31 aliases")
    assert len(CALLS) == 90  # three allowed requests of 30 fields; the refused ones ran nothing
    assert verdicts[thirty].errors == [] and verdicts[commented].errors == []
    assert verdicts[thirty].document is not verdicts[commented].document
    assert [error.extensions["limit"] for error in verdicts[thirty_one].errors] == ["aliases"]  # type: ignore[index]


async def test_limits_apply_on_websockets_too(db: Database) -> None:
    token = hs256_token("ws-limits")
    bomb = "{ " + " ".join(f"a{i}: plans {{ id }}" for i in range(40)) + " }"
    async with (
        serve_api(db) as api,
        httpx.AsyncClient() as client,
        aconnect_ws(api.endpoint, client, subprotocols=["graphql-transport-ws"]) as ws,
    ):
        await ws.send_json({"type": "connection_init", "payload": {"Authorization": f"Bearer {token}"}})
        assert (await ws.receive_json(timeout=5))["type"] == "connection_ack"
        await ws.send_json({"id": "1", "type": "subscribe", "payload": {"query": bomb}})
        answer = await ws.receive_json(timeout=FAST)
        await ws.send_json(
            {"id": "2", "type": "subscribe", "payload": {"query": "{ " + "plans { id } " * 300 + "}"}}
        )
        flood = await ws.receive_json(timeout=FAST)
    assert answer["type"] == "error" and answer["id"] == "1"
    assert [(e["extensions"]["code"], e["extensions"]["limit"]) for e in answer["payload"]] == [
        (QUERY_TOO_COMPLEX, "aliases")
    ]
    assert flood["type"] == "error" and flood["payload"][0]["extensions"]["limit"] == "tokens"


# List arguments are capped ---------------------------------------------------------------------


async def test_viewer_invoices_returns_at_most_a_page_of_100(db: Database) -> None:
    await insert_account(db, "many-invoices")
    now = datetime.now(UTC)
    rows = [
        {
            "id": f"in_{n:04d}",
            "stripe_customer_id": "cus_many-invoices",
            "status": "paid",
            "currency": "usd",
            "amount_due": 100,
            "amount_paid": 100,
            "amount_remaining": 0,
            "total": 100,
            "created": now - timedelta(minutes=n),
            "synced_at": now,
        }
        for n in range(120)
    ]
    async with db.write() as conn:
        await conn.execute(insert(invoice_table), rows)
    token = hs256_token("many-invoices")
    async with serve_api(db) as api:
        capped = await api.query("{ viewer { invoices(first: 1000) { id } } }", token=token)
        default = await api.query("{ viewer { invoices { id } } }", token=token)
        zero = await api.query("{ viewer { invoices(first: 0) { id } } }", token=token)
    assert len(capped["data"]["viewer"]["invoices"]) == 100
    assert capped["data"]["viewer"]["invoices"][0]["id"] == "in_0000"
    assert len(default["data"]["viewer"]["invoices"]) == 10
    assert error_codes(zero) == ["BAD_USER_INPUT"]
