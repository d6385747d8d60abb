"""ENVIRONMENT=production: no introspection, no GraphiQL, no suggestions, masked errors.

Development keeps them all, so each test asks both.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import strawberry
from httpx_ws import aconnect_ws
from strawberry.tools import merge_types

from db.engine import Database
from graph.schema import Query as BillingQuery
from graph.schema import build_schema
from tests.test_graphql_support import hs256_token, only_error, serve_api

PRODUCTION_SECRET = "a-production-grade-secret-of-40-characters"
PRODUCTION = {
    "environment": "production",
    "stripe_webhook_secret": "whsec_production_like_secret",
    "auth_jwt_secret": PRODUCTION_SECRET,
    "metrics_token": "a-metrics-token-for-the-scraper-of-40-chars",
}
ENVIRONMENTS = {"development": {}, "production": PRODUCTION}


async def both(
    db: Database, query: str, variables: dict[str, Any] | None = None, **kw: Any
) -> dict[str, Any]:
    """The same request answered in development and in production."""
    answers = {}
    for name, settings in ENVIRONMENTS.items():
        secret = PRODUCTION_SECRET if name == "production" else None
        token = hs256_token("lockdown", **({"secret": secret} if secret else {}))
        async with serve_api(db, **settings, **kw) as api:
            answers[name] = await api.query(query, variables, token=token)
    return answers


async def test_introspection_is_refused_in_production_only(db: Database) -> None:
    schema_query = "{ __schema { queryType { name } types { name } } }"
    type_query = '{ __type(name: "Plan") { fields { name } } }'
    schema_answers = await both(db, schema_query)
    type_answers = await both(db, type_query)
    typename = await both(db, "{ __typename plans { __typename id } }")

    assert schema_answers["development"]["data"]["__schema"]["queryType"] == {"name": "Query"}
    assert type_answers["development"]["data"]["__type"]["fields"]
    for answers, field in ((schema_answers, "__schema"), (type_answers, "__type")):
        errors = answers["production"]["errors"]  # one per field of an introspection type
        assert errors[0]["message"] == (
            f"GraphQL introspection has been disabled, but the requested query contained the field '{field}'."
        )
        for error in errors:
            assert error["extensions"] == {"code": "GRAPHQL_VALIDATION_FAILED"}
            assert error["message"].startswith("GraphQL introspection has been disabled")
        assert answers["production"]["data"] is None
    assert typename["production"] == typename["development"]
    assert typename["production"]["data"]["__typename"] == "Query"


async def test_graphiql_is_served_in_development_only(db: Database) -> None:
    html = {"Accept": "text/html"}
    async with serve_api(db) as api, httpx.AsyncClient() as client:
        development = await client.get(api.endpoint, headers=html)
    async with serve_api(db, **PRODUCTION) as api, httpx.AsyncClient() as client:
        production = await client.get(api.endpoint, headers=html)
    assert development.status_code == 200 and "graphiql" in development.text.lower()
    assert production.status_code == 404 and "graphiql" not in production.text.lower()


@pytest.mark.parametrize(
    ("query", "variables", "code"),
    [
        ("{ plan { id } }", None, "GRAPHQL_VALIDATION_FAILED"),  # field: plans
        ("{ plans { idd } }", None, "GRAPHQL_VALIDATION_FAILED"),  # field: id
        ('{ access(featur: "api_access") { allowed } }', None, "BAD_USER_INPUT"),  # argument
        (
            "mutation { createCheckoutSession(tier: STARTR, interval: MONTHLY) { url } }",
            None,
            "BAD_USER_INPUT",
        ),
        (
            "mutation($t: Tier!) { createCheckoutSession(tier: $t, interval: MONTHLY) { url } }",
            {"t": "STARTR"},
            "BAD_USER_INPUT",
        ),  # a variable, coerced at execution
        ("query($t: Tierr!) { plans { id } }", None, "GRAPHQL_VALIDATION_FAILED"),  # type name
    ],
)
async def test_no_suggestions_in_production(
    db: Database, query: str, variables: dict[str, Any] | None, code: str
) -> None:
    answers = await both(db, query, variables)
    assert "Did you mean" in json.dumps(answers["development"])
    assert "Did you mean" not in json.dumps(answers["production"])
    for answer in answers.values():
        assert answer["data"] is None
        assert {error["extensions"]["code"] for error in answer["errors"]} == {code}
    development = [error["message"].split(" Did you mean")[0] for error in answers["development"]["errors"]]
    assert [error["message"] for error in answers["production"]["errors"]] == development


async def test_no_suggestions_on_production_websockets(db: Database) -> None:
    token = hs256_token("lockdown-ws", secret=PRODUCTION_SECRET)
    async with (
        serve_api(db, **PRODUCTION) as api,
        httpx.AsyncClient() as client,
        aconnect_ws(api.endpoint, client, subprotocols=["graphql-transport-ws"]) as ws,
    ):
        await ws.send_json({"type": "connection_init", "payload": {"Authorization": f"Bearer {token}"}})
        assert (await ws.receive_json(timeout=5))["type"] == "connection_ack"
        await ws.send_json({"id": "1", "type": "subscribe", "payload": {"query": "{ plan { id } }"}})
        answer = await ws.receive_json(timeout=5)
        await ws.send_json(
            {"id": "2", "type": "subscribe", "payload": {"query": "{ __schema { types { name } } }"}}
        )
        introspection = await ws.receive_json(timeout=5)
    assert answer["type"] == "error"
    assert [error["message"] for error in answer["payload"]] == ["Cannot query field 'plan' on type 'Query'."]
    assert introspection["type"] == "error"
    assert "introspection has been disabled" in introspection["payload"][0]["message"]


@strawberry.type
class Broken:
    @strawberry.field
    async def explode(self) -> str:
        raise RuntimeError(
            f"connection to postgresql://admin:hunter2@db.internal failed, jwt {PRODUCTION_SECRET}"
        )


BROKEN_SCHEMA = build_schema(merge_types("Query", (BillingQuery, Broken)))


async def test_internal_errors_are_masked_in_production(db: Database) -> None:
    async with serve_api(db, schema=BROKEN_SCHEMA, **PRODUCTION) as api:
        response = await api.post("{ explode }", headers={"X-Request-ID": "prod-req-1"})
    error = only_error(response.json())
    assert error["message"] == "Internal server error"
    assert error["extensions"] == {"code": "INTERNAL_ERROR", "requestId": "prod-req-1"}
    for leak in ("hunter2", PRODUCTION_SECRET, "postgresql", "RuntimeError", "Traceback"):
        assert leak not in response.text
