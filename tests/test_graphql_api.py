"""The GraphQL endpoint over HTTP and websocket: transport, plans, error codes, masking, one load per request."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import strawberry
from httpx_ws import WebSocketDisconnect, aconnect_ws
from sqlalchemy import event
from strawberry.extensions import ParserCache, SchemaExtension, ValidationCache
from strawberry.tools import merge_types

from billing.plans import load_catalog
from billing.settings import Settings
from db.engine import Database
from graph.schema import Query as BillingQuery
from graph.schema import build_schema, schema
from tests.conftest import Service, free_port
from tests.test_graphql_support import (
    error_codes,
    hs256_token,
    insert_account,
    only_error,
    serve_api,
)

PLANS = "{ plans { id tier interval name amount currency trialDays features limits { feature limit } } }"
PRODUCTION = {
    "environment": "production",
    "stripe_webhook_secret": "whsec_production_like_secret",
    "auth_jwt_secret": "a-production-grade-secret-of-40-characters",
    "metrics_token": "a-metrics-token-for-the-scraper-of-40-chars",
}


# Transport -------------------------------------------------------------------------------------


async def test_plans_are_public_and_match_the_catalog(database: Database) -> None:
    catalog = load_catalog()
    async with serve_api(database) as api:
        result = await api.query(PLANS)
    plans = {plan["id"]: plan for plan in result["data"]["plans"]}
    assert set(plans) == {"starter_monthly", "starter_annual", "pro_monthly", "pro_annual"}
    pro = plans["pro_monthly"]
    assert pro["tier"] == "PRO" and pro["interval"] == "MONTHLY" and pro["name"] == "Pro"
    assert pro["amount"] == 9900 and pro["currency"] == "usd" and pro["trialDays"] == catalog.trial_days
    assert (
        "advanced_analytics" in pro["features"]
        and "advanced_analytics" not in plans["starter_annual"]["features"]
    )
    assert {"feature": "api_calls", "limit": 100000} in pro["limits"]
    assert plans["starter_annual"]["amount"] == 29000


async def test_get_serves_queries_and_refuses_mutations(database: Database) -> None:
    async with serve_api(database) as api, httpx.AsyncClient() as client:
        query = await client.get(api.endpoint, params={"query": "{ plans { id } }"})
        mutation = await client.get(api.endpoint, params={"query": "mutation { plans { id } }"})
    assert query.status_code == 200 and len(query.json()["data"]["plans"]) == 4
    assert mutation.status_code == 400 and "not allowed when using GET" in mutation.text


async def test_graphiql_in_development_only(database: Database) -> None:
    html = {"Accept": "text/html"}
    async with serve_api(database) as api, httpx.AsyncClient() as client:
        development = await client.get(api.endpoint, headers=html)
    async with serve_api(database, **PRODUCTION) as api, httpx.AsyncClient() as client:
        production = await client.get(api.endpoint, headers=html)
        still_served = await client.post(api.endpoint, json={"query": "{ plans { id } }"})
    assert development.status_code == 200 and "graphiql" in development.text.lower()
    assert production.status_code == 404 and "graphiql" not in production.text.lower()
    assert still_served.status_code == 200 and len(still_served.json()["data"]["plans"]) == 4


async def ws_operation(ws: Any, operation_id: str, query: str) -> dict[str, Any]:
    await ws.send_json({"id": operation_id, "type": "subscribe", "payload": {"query": query}})
    message = await ws.receive_json(timeout=5)
    assert message["type"] == "next" and message["id"] == operation_id, message
    complete = await ws.receive_json(timeout=5)
    assert complete == {"id": operation_id, "type": "complete"}
    payload: dict[str, Any] = message["payload"]
    return payload


async def test_graphql_transport_ws_runs_operations_with_fresh_state_each(database: Database) -> None:
    token = hs256_token("ws-user")
    query = "{ viewer { id subscription { status tier } } }"
    async with (
        serve_api(database) as api,
        httpx.AsyncClient() as client,
        aconnect_ws(api.endpoint, client, subprotocols=["graphql-transport-ws"]) as ws,
    ):
        assert ws.subprotocol == "graphql-transport-ws"
        await ws.send_json({"type": "connection_init", "payload": {"Authorization": f"Bearer {token}"}})
        assert (await ws.receive_json(timeout=5))["type"] == "connection_ack"
        before = await ws_operation(ws, "1", query)
        await insert_account(database, "ws-user", status="active", tier="pro")
        after = await ws_operation(ws, "2", query)  # not served from the first operation's cache
        await ws.send_json({"id": "3", "type": "subscribe", "payload": {"query": "{ plans { id "}})
        broken = await ws.receive_json(timeout=5)
    assert before == {
        "data": {"viewer": {"id": "ws-user", "subscription": {"status": "NONE", "tier": "NONE"}}}
    }
    assert after["data"]["viewer"]["subscription"] == {"status": "ACTIVE", "tier": "PRO"}
    assert broken["type"] == "error" and broken["id"] == "3"  # the protocol's answer to a bad document
    assert [error["extensions"]["code"] for error in broken["payload"]] == ["GRAPHQL_PARSE_FAILED"]


async def test_the_legacy_graphql_ws_protocol_is_not_offered(database: Database) -> None:
    async with (
        serve_api(database) as api,
        httpx.AsyncClient() as client,
        aconnect_ws(api.endpoint, client, subprotocols=["graphql-ws"]) as ws,
    ):
        assert ws.subprotocol is None
        with pytest.raises(WebSocketDisconnect) as closed:
            await ws.receive_json(timeout=5)
    assert closed.value.code == 4406


async def test_the_service_fixture_app_serves_the_billing_schema(service: Service) -> None:
    """The app as `billing serve` builds it (sandbox mode, webhook worker on) answers too."""
    await insert_account(service.database, "svc-user", status="trialing", tier="starter")
    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"{service.url}/graphql",
            json={"query": "{ viewer { subscription { status tier hasAccess } } plans { id } }"},
            headers={"Authorization": f"Bearer {hs256_token('svc-user')}"},
        )
    data = response.json()["data"]
    assert data["viewer"]["subscription"] == {"status": "TRIALING", "tier": "STARTER", "hasAccess": True}
    assert len(data["plans"]) == 4


def test_the_schema_runs_the_parser_and_validation_caches() -> None:
    extensions = schema.get_extensions()
    assert any(isinstance(extension, ParserCache) for extension in extensions)
    assert any(isinstance(extension, ValidationCache) for extension in extensions)


class _SeesOperations(SchemaExtension):
    seen: list[str | None] = []

    def on_operation(self) -> Iterator[None]:
        _SeesOperations.seen.append(self.execution_context.query)
        yield


async def test_a_host_schema_with_its_own_extension_sees_every_request(database: Database) -> None:
    """Valid POSTs skip Strawberry's per-request machinery (graph.lean_executor) only for schemas
    built without extra extensions: a host app's extension still runs on each one."""
    _SeesOperations.seen.clear()
    host = build_schema(merge_types("Query", (BillingQuery,)), extensions=[_SeesOperations])
    query = "{ plans { id } }"
    async with serve_api(database, schema=host) as api:
        results = [await api.query(query) for _ in range(2)]
        lean = api.app.graphql_websocket.lean
    async with serve_api(database) as billing_api:
        plain = await billing_api.query(query)
        billing_lean = billing_api.app.graphql_websocket.lean
    assert lean is None and _SeesOperations.seen == [query, query]
    assert all(len(result["data"]["plans"]) == 4 for result in [*results, plain])
    assert (billing_lean is not None) is Settings().fast_paths


def test_no_graphql_type_is_called_subscription() -> None:
    sdl = schema.as_str()
    assert "type Subscription " not in sdl and "type BillingSubscription {" in sdl


# Error codes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "variables", "code"),
    [
        ("{ plans { id }", None, "GRAPHQL_PARSE_FAILED"),
        ("{ plans { nope } }", None, "GRAPHQL_VALIDATION_FAILED"),
        ("{ access(feature: 42) { allowed } }", None, "BAD_USER_INPUT"),
        ("{ access { allowed } }", None, "BAD_USER_INPUT"),
        ('{ access(feature: "api_access", extra: 1) { allowed } }', None, "BAD_USER_INPUT"),
        ("query($f: String!) { access(feature: $f) { allowed } }", {"f": 42}, "BAD_USER_INPUT"),
        ("query($f: String!) { access(feature: $f) { allowed } }", {}, "BAD_USER_INPUT"),
        ('{ access(feature: "not a feature!") { allowed } }', None, "BAD_USER_INPUT"),
    ],
)
async def test_client_mistakes_have_stable_codes(
    database: Database, query: str, variables: dict[str, Any] | None, code: str
) -> None:
    async with serve_api(database) as api:
        first = await api.query(query, variables)
        second = await api.query(query, variables)  # served from the parser/validation caches
    assert error_codes(first) == [code], first
    assert second == first
    assert "Traceback" not in json.dumps(first)


@strawberry.type
class Broken:
    @strawberry.field
    async def explode(self) -> str:
        raise RuntimeError("connection to postgresql://admin:hunter2@db.internal failed, key sk_live_123")

    @strawberry.field
    async def null_for_non_null(self) -> str:
        return None  # type: ignore[return-value]


BROKEN_SCHEMA = build_schema(merge_types("Query", (BillingQuery, Broken)))


@contextmanager
def captured(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="billing.graphql"):
        yield caplog


async def test_unexpected_exceptions_are_masked_and_logged_with_the_request_id(
    database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    async with serve_api(database, schema=BROKEN_SCHEMA) as api:
        with captured(caplog):
            response = await api.post("{ explode plans { id } }", headers={"X-Request-ID": "req-abc.123"})
            logged = [record for record in caplog.records if "req-abc.123" in record.getMessage()]
        with captured(caplog):
            other = await api.query("{ nullForNonNull }")
            other_logs = [record.getMessage() for record in caplog.records]
    body = response.json()
    error = only_error(body)
    assert error["message"] == "Internal server error"
    assert error["extensions"] == {"code": "INTERNAL_ERROR", "requestId": "req-abc.123"}
    assert body["data"] is None  # a non-null root field failed
    assert response.headers["x-request-id"] == "req-abc.123"
    for leak in ("hunter2", "sk_live_123", "postgresql", "RuntimeError", "Traceback", "File "):
        assert leak not in response.text
    assert len(logged) == 1 and logged[0].exc_info is not None
    assert "hunter2" in str(logged[0].exc_info[1])  # the log keeps what the response hides

    masked = only_error(other)
    assert masked["message"] == "Internal server error" and masked["extensions"]["code"] == "INTERNAL_ERROR"
    assert any(masked["extensions"]["requestId"] in line for line in other_logs)


async def test_an_unreachable_database_is_a_masked_internal_error(caplog: pytest.LogCaptureFixture) -> None:
    unreachable = Database.from_url(f"postgresql+asyncpg://postgres:s3cret@127.0.0.1:{free_port()}/billing")
    try:
        async with serve_api(unreachable) as api:
            with captured(caplog):
                result = await api.query("{ viewer { subscription { tier } } }", token=hs256_token())
    finally:
        await unreachable.dispose()
    error = only_error(result)
    assert error["message"] == "Internal server error"
    assert error["extensions"]["code"] == "INTERNAL_ERROR"
    assert "s3cret" not in json.dumps(result) and "127.0.0.1" not in json.dumps(result)
    assert any(error["extensions"]["requestId"] in record.getMessage() for record in caplog.records)


# One load per request --------------------------------------------------------------------------


@contextmanager
def account_selects(database: Database) -> Iterator[list[str]]:
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "billing_account" in statement:
            statements.append(statement)

    event.listen(database.engine.sync_engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(database.engine.sync_engine, "before_cursor_execute", record)


async def test_the_viewer_account_is_read_once_per_request(database: Database) -> None:
    await insert_account(database, "once", status="active", tier="starter")
    query = """{
      viewer { id subscription { tier hasAccess } }
      again: viewer { email }
      a: access(feature: "api_access") { allowed }
      b: access(feature: "advanced_analytics") { allowed reason requiredTier }
    }"""
    async with serve_api(database) as api:
        with account_selects(database) as statements:
            result = await api.query(query, token=hs256_token("once"))
        assert len(statements) == 1, statements
        with account_selects(database) as statements:
            await api.query(query, token=hs256_token("once"))
        assert len(statements) == 1  # the next request reads again: nothing stale is kept
    data = result["data"]
    assert data["viewer"]["subscription"] == {"tier": "STARTER", "hasAccess": True}
    assert data["a"] == {"allowed": True}
    assert data["b"] == {"allowed": False, "reason": "FEATURE_NOT_IN_PLAN", "requiredTier": "PRO"}


async def test_no_token_no_database_read_for_public_fields(database: Database) -> None:
    async with serve_api(database) as api:
        with account_selects(database) as statements:
            result = await api.query('{ plans { id } access(feature: "api_access") { allowed reason } }')
    assert statements == []
    assert result["data"]["access"] == {"allowed": False, "reason": "UNAUTHENTICATED"}
