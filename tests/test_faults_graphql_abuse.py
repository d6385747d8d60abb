"""Fault matrix, GraphQL abuse: hostile documents and requests get their exact answer, and a
mutation smuggled inside one never runs.

Every row here carries `recordUsage` (service key, for a subscribed user): a mutation that
writes a usage record and a rollup the moment it runs. Each abuse must leave every state table
as it was (`tests/db_snapshot.py`); then the same mutation sent properly records, so the
comparison could have failed.

Rows, and where each is tested:

| row | where |
|---|---|
| deep query (fields, fragments, introspection; nested beyond the parser) | `test_limits.py::test_a_deep_query_is_refused`, `::test_depth_through_a_chain_of_fragments_is_refused`, `::test_deep_introspection_is_refused`, `::test_a_document_nested_beyond_the_parser_is_too_complex` |
| alias bomb | `test_limits.py::test_an_alias_bomb_is_refused_before_any_resolver_runs`; here: of mutations (`test_an_abusive_request_is_refused_exactly_and_no_mutation_runs[alias bomb]`) |
| fragment-spread bombs (doubling spreads, cycles) | `test_limits.py::test_doubling_fragment_spreads_are_refused_fast`, `::test_fragment_cycles_are_reported_fast`; here: doubling spreads of a mutation fragment |
| token flood (fields, comments) | `test_limits.py::test_a_token_flood_is_refused_by_the_parser`; here: inside a mutation |
| cost | `test_limits.py::test_a_costly_query_is_refused` |
| limits over the websocket | `test_limits.py::test_limits_apply_on_websockets_too` |
| introspection in production | `test_security_lockdown.py::test_introspection_is_refused_in_production_only` |
| suggestions in production (fields, arguments, types, enum values, variables; websockets) | `test_security_lockdown.py::test_no_suggestions_in_production`, `::test_no_suggestions_on_production_websockets`; here: a misspelled mutation field, argument and input field (in a variable, coerced at execution) in production, with no suggestion and nothing written |
| mutation over GET (alone, or named in a document with a query) | `test_security_http.py::test_mutations_are_never_served_over_get`, `test_graphql_api.py::test_get_serves_queries_and_refuses_mutations`; here: nothing written |
| form-encoded, multipart, `text/plain`, untyped POSTs | `test_security_http.py::test_posts_that_are_not_json_are_refused_with_415`; here: nothing written |
| oversized body, declared or streamed | `test_security_http.py::test_an_oversized_body_is_refused_with_413`, `::test_the_default_body_limit_is_one_mebibyte`; here: nothing written |
| batched operations | `test_security_http.py::test_batched_requests_are_refused`; here: a batch of mutations, nothing written |
| graphql-ws: `subscribe` before `connection_init` | `test_realtime.py::test_subscribing_before_connection_init_closes_the_socket_with_4401`; here: with a mutation, closed 4401, nothing written |
| graphql-ws protocol abuse: a second `connection_init` (4429), an operation id already running (4409), a frame that is not JSON or of an unknown type (4400) | here, each with a mutation that must not run |
| graphql-ws: bad token in `connection_init`; legacy `graphql-ws` protocol | `test_realtime.py::test_a_bad_or_missing_token_closes_the_socket_with_4403`, `test_graphql_api.py::test_the_legacy_graphql_ws_protocol_is_not_offered`; here: a mutation after a refused init, nothing written |
| websocket origins, connection and operation caps | `test_security_http.py::test_websocket_handshakes_from_other_origins_are_refused`, `test_realtime.py::test_operations_per_connection_are_capped_by_ws_max_operations`, `::test_connections_per_process_are_capped_by_ws_max_connections` |
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from db.engine import Database
from db.models import usage_table
from graph.limits import QUERY_TOO_COMPLEX
from tests.db_snapshot import unchanged
from tests.graphql_support import PRODUCTION, SERVICE_KEY, Api, hs256_token, insert_account, serve_api
from tests.realtime_support import SUBSCRIPTION, live_socket

MAX_BYTES = 8192
KEY = "abuse-key"


def record(alias: str = "", key: str = KEY) -> str:
    field = f'recordUsage(input: {{userId: "member", feature: "api_calls", quantity: 1, idempotencyKey: "{key}"}})'
    return f"{alias}{field} {{ id duplicate }}"


RECORD = f"mutation {{ {record()} }}"
AUTH = {"Authorization": f"Bearer {SERVICE_KEY}"}


@dataclass(frozen=True)
class Refusal:
    """What the client gets: the HTTP status (or websocket close code), the codes, a message."""

    status: int
    codes: tuple[str, ...]
    message: str | None = None  # a piece of the (first) message, when it says something specific


Send = Callable[[Api], Awaitable[Refusal]]


def _refusal(response: httpx.Response) -> Refusal:
    try:
        body = response.json()
    except json.JSONDecodeError:
        return Refusal(response.status_code, (), response.text)
    errors = body.get("errors") or []
    assert body.get("data") is None, body
    codes = tuple(error.get("extensions", {}).get("code") for error in errors)
    return Refusal(response.status_code, codes, " | ".join(error["message"] for error in errors) or None)


async def _post(api: Api, content: bytes | Any, content_type: str | None) -> httpx.Response:
    headers = dict(AUTH)
    if content_type is not None:
        headers["Content-Type"] = content_type
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.post(api.endpoint, content=content, headers=headers)


async def over_get(api: Api) -> Refusal:
    async with httpx.AsyncClient(timeout=10) as client:
        return _refusal(await client.get(api.endpoint, params={"query": RECORD}, headers=AUTH))


async def named_over_get(api: Api) -> Refusal:
    document = f"query Plans {{ plans {{ id }} }} mutation Record {{ {record()} }}"
    params = {"query": document, "operationName": "Record"}
    async with httpx.AsyncClient(timeout=10) as client:
        return _refusal(await client.get(api.endpoint, params=params, headers=AUTH))


def _posted(content_type: str | None, body: bytes) -> Send:
    async def send(api: Api) -> Refusal:
        return _refusal(await _post(api, body, content_type))

    return send


async def declared_too_large(api: Api) -> Refusal:
    body = json.dumps({"query": RECORD, "variables": {"padding": "x" * MAX_BYTES}}).encode()
    return _refusal(await _post(api, body, "application/json"))


async def streamed_too_large(api: Api) -> Refusal:
    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
        yield json.dumps({"query": RECORD})[:-1].encode() + b', "variables": {"padding": "'
        for _ in range(2 * MAX_BYTES // 500):
            yield b"x" * 500
        yield b'"}}'

    return _refusal(await _post(api, chunks(), "application/json"))


async def batch(api: Api) -> Refusal:
    body = json.dumps([{"query": RECORD}, {"query": RECORD.replace(KEY, "second")}]).encode()
    return _refusal(await _post(api, body, "application/json"))


def _document(document: str, variables: dict[str, Any] | None = None) -> Send:
    async def send(api: Api) -> Refusal:
        body = {"query": document, "variables": variables}
        return _refusal(await _post(api, json.dumps(body).encode(), "application/json"))

    return send


ALIAS_BOMB = "mutation { " + " ".join(record(f"a{i}: ", f"{KEY}-{i}") for i in range(31)) + " }"
FRAGMENT_BOMB = (
    "mutation { ...F0 }\n"
    + "".join(f"fragment F{i} on Mutation {{ ...F{i + 1} ...F{i + 1} }}\n" for i in range(12))
    + f"fragment F12 on Mutation {{ {record('a: ')} }}"
)
TOKEN_FLOOD = f"mutation {{ {record()[: -len('{ id duplicate }')]}{{ {'id ' * 1000}}} }}"


def init(token: str) -> dict[str, Any]:
    return {"type": "connection_init", "payload": {"authorization": f"Bearer {token}"}}


SUBSCRIBE_RECORD = {"id": "record", "type": "subscribe", "payload": {"query": RECORD}}


def _over_the_socket(*messages: dict[str, Any] | str) -> Send:
    """Send these graphql-transport-ws messages (a str is sent as a raw text frame) in order."""

    async def send(api: Api) -> Refusal:
        async with live_socket(api.url, init=False) as socket:
            for message in messages:
                if isinstance(message, str):
                    await socket.ws.send_text(message)
                else:
                    await socket.send(message)
            code = await socket.closed_with()
            assert all(m.get("type") != "next" for m in socket.unread()), socket.unread()
        return Refusal(code, ())

    return send


# case -> (how it is sent, what is answered, served in production)
CASES: dict[str, tuple[Send, Refusal, bool]] = {
    "mutation over GET": (over_get, Refusal(400, (), "mutations are not allowed when using GET"), False),
    "named mutation over GET": (
        named_over_get,
        Refusal(400, (), "mutations are not allowed when using GET"),
        False,
    ),
    "form-encoded POST": (
        _posted(
            "application/x-www-form-urlencoded",
            b"query=" + RECORD.replace(" ", "+").replace('"', "%22").encode(),
        ),
        Refusal(415, ("UNSUPPORTED_MEDIA_TYPE",)),
        False,
    ),
    "multipart POST": (
        _posted(
            "multipart/form-data; boundary=x",
            b'--x\r\nContent-Disposition: form-data; name="query"\r\n\r\n'
            + RECORD.encode()
            + b"\r\n--x--\r\n",
        ),
        Refusal(415, ("UNSUPPORTED_MEDIA_TYPE",)),
        False,
    ),
    "text/plain POST": (
        _posted("text/plain", json.dumps({"query": RECORD}).encode()),
        Refusal(415, ("UNSUPPORTED_MEDIA_TYPE",)),
        False,
    ),
    "POST without a content type": (
        _posted(None, json.dumps({"query": RECORD}).encode()),
        Refusal(415, ("UNSUPPORTED_MEDIA_TYPE",)),
        False,
    ),
    "oversized body, declared": (declared_too_large, Refusal(413, ("REQUEST_TOO_LARGE",)), False),
    "oversized body, streamed": (streamed_too_large, Refusal(413, ("REQUEST_TOO_LARGE",)), False),
    "batch of mutations": (batch, Refusal(400, ("BATCH_NOT_SUPPORTED",)), False),
    "alias bomb": (
        _document(ALIAS_BOMB),
        Refusal(200, (QUERY_TOO_COMPLEX,), "The query uses 31 aliases"),
        False,
    ),
    "doubling fragment spreads": (
        _document(FRAGMENT_BOMB),
        Refusal(200, (QUERY_TOO_COMPLEX, QUERY_TOO_COMPLEX), "The query uses 4,096 aliases"),  # and its cost
        False,
    ),
    "token flood": (
        _document(TOKEN_FLOOD),
        Refusal(200, (QUERY_TOO_COMPLEX,), "The query has more than 1000 tokens"),
        False,
    ),
    "production: misspelled mutation": (
        _document(RECORD.replace("recordUsage", "recordUsages")),
        Refusal(200, ("GRAPHQL_VALIDATION_FAILED",), "Cannot query field 'recordUsages' on type 'Mutation'."),
        True,
    ),
    "production: misspelled argument": (
        _document(RECORD.replace("idempotencyKey", "idempotencyKy")),
        Refusal(
            200,
            ("BAD_USER_INPUT", "BAD_USER_INPUT"),
            "not to include unknown field 'idempotencyKy'.",
        ),
        True,
    ),
    "production: misspelled input field in a variable": (
        _document(
            "mutation($i: RecordUsageInput!) { recordUsage(input: $i) { id } }",
            {"i": {"userId": "member", "feature": "api_calls", "quantity": 1, "idempotencyKy": KEY}},
        ),
        Refusal(200, ("BAD_USER_INPUT", "BAD_USER_INPUT"), "not to include unknown field 'idempotencyKy'."),
        True,
    ),
    "websocket: subscribe before connection_init": (
        _over_the_socket(SUBSCRIBE_RECORD),
        Refusal(4401, ()),
        False,
    ),
    "websocket: subscribe after a refused connection_init": (
        _over_the_socket(init("not-a-token"), SUBSCRIBE_RECORD),
        Refusal(4403, ()),
        False,
    ),
    "websocket: a second connection_init": (
        _over_the_socket(init(SERVICE_KEY), init(SERVICE_KEY), SUBSCRIBE_RECORD),
        Refusal(4429, ()),
        False,
    ),
    "websocket: an operation id already running": (
        _over_the_socket(
            init(hs256_token("member")),
            {"id": "record", "type": "subscribe", "payload": {"query": SUBSCRIPTION}},
            SUBSCRIBE_RECORD,
        ),
        Refusal(4409, ()),
        False,
    ),
    "websocket: a frame that is not JSON": (
        _over_the_socket(init(SERVICE_KEY), '{"type": "subscribe", "id": "record", "payload": '),
        Refusal(4400, ()),
        False,
    ),
    "websocket: an unknown message type": (
        _over_the_socket(init(SERVICE_KEY), {**SUBSCRIBE_RECORD, "type": "execute"}),
        Refusal(4400, ()),
        False,
    ),
}


@pytest.fixture
async def member(database: Database) -> Database:
    await insert_account(database, "member", tier="starter")
    return database


@pytest.mark.parametrize("case", list(CASES))
async def test_an_abusive_request_is_refused_exactly_and_no_mutation_runs(
    member: Database, case: str
) -> None:
    send, expected, production = CASES[case]
    settings: dict[str, Any] = {
        "service_api_key": SERVICE_KEY,
        "usage_reporter": False,
        "max_request_bytes": MAX_BYTES,
    }
    if production:
        settings.update(PRODUCTION)
    async with serve_api(member, **settings) as api:
        async with unchanged(member):
            answer = await send(api)
        proper = await api.query(RECORD, token=SERVICE_KEY)

    assert (answer.status, answer.codes) == (expected.status, expected.codes), answer
    if expected.message is not None:
        assert answer.message is not None and expected.message in answer.message, answer
    if answer.message is not None:
        assert "Did you mean" not in answer.message
    assert proper["data"]["recordUsage"]["duplicate"] is False  # the same mutation, sent properly, writes
    async with member.read() as conn:
        assert (await conn.execute(select(func.count()).select_from(usage_table))).scalar_one() == 1
