"""Request safety on /graphql: no mutations over GET, JSON only, bounded bodies, no batches, CORS."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from httpx_ws import WebSocketUpgradeError, aconnect_ws

from billing.settings import Settings
from db.engine import Database
from tests.graphql_support import PRODUCTION, hs256_token, serve_api

PLANS = {"query": "{ plans { id } }"}
APP_ORIGIN = "http://app.test"  # the tests' APP_URL


def code_of(response: httpx.Response) -> str:
    errors = response.json()["errors"]
    assert len(errors) == 1, errors
    code: str = errors[0]["extensions"]["code"]
    return code


# GET ---------------------------------------------------------------------------------------------


async def test_mutations_are_never_served_over_get(db: Database) -> None:
    document = "query Plans { plans { id } } mutation Portal { createPortalSession { url } }"
    token = hs256_token("get-user")
    async with serve_api(db) as api, httpx.AsyncClient() as client:
        query = await client.get(api.endpoint, params={"query": "{ plans { id } }"})
        mutation = await client.get(
            api.endpoint,
            params={"query": "mutation { createPortalSession { url } }"},
            headers={"Authorization": f"Bearer {token}"},
        )
        named = await client.get(
            api.endpoint,
            params={"query": document, "operationName": "Portal"},
            headers={"Authorization": f"Bearer {token}"},
        )
        other = await client.get(api.endpoint, params={"query": document, "operationName": "Plans"})
    assert query.status_code == 200 and len(query.json()["data"]["plans"]) == 4
    assert mutation.status_code == 400 and "mutations are not allowed when using GET" in mutation.text
    assert named.status_code == 400 and "mutations are not allowed when using GET" in named.text
    assert other.status_code == 200 and len(other.json()["data"]["plans"]) == 4


# Content type ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/x-www-form-urlencoded", b"query=mutation+%7B+createPortalSession+%7B+url+%7D+%7D"),
        (
            "multipart/form-data; boundary=x",
            b'--x\r\nContent-Disposition: form-data; name="query"\r\n\r\n{ plans { id } }\r\n--x--\r\n',
        ),
        ("text/plain", b'{"query": "{ plans { id } }"}'),
        ("application/graphql", b"{ plans { id } }"),
        ("application/jsonp", b'{"query": "{ plans { id } }"}'),
        (None, b'{"query": "{ plans { id } }"}'),
    ],
)
async def test_posts_that_are_not_json_are_refused_with_415(
    db: Database, content_type: str | None, body: bytes
) -> None:
    headers = {"Authorization": f"Bearer {hs256_token('form-user')}"}
    if content_type is not None:
        headers["Content-Type"] = content_type
    async with serve_api(db) as api, httpx.AsyncClient() as client:
        response = await client.post(api.endpoint, content=body, headers=headers)
    assert response.status_code == 415
    assert code_of(response) == "UNSUPPORTED_MEDIA_TYPE"
    assert response.headers["content-type"] == "application/json"


async def test_json_with_a_charset_is_accepted(db: Database) -> None:
    async with serve_api(db) as api, httpx.AsyncClient() as client:
        response = await client.post(
            api.endpoint,
            content=b'{"query": "{ plans { id } }"}',
            headers={"Content-Type": "Application/JSON; charset=utf-8"},
        )
    assert response.status_code == 200 and len(response.json()["data"]["plans"]) == 4


# Body size ---------------------------------------------------------------------------------------


async def test_an_oversized_body_is_refused_with_413(db: Database) -> None:
    padding = "x" * 3000
    big = {"query": "{ plans { id } }", "variables": {"padding": padding}}

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while it streams in
        yield b'{"query": "{ plans { id } }", "variables": {"padding": "'
        for _ in range(10):
            yield b"x" * 500
        yield b'"}}'

    async with serve_api(db, max_request_bytes=2048) as api, httpx.AsyncClient() as client:
        declared = await client.post(api.endpoint, json=big)
        streamed = await client.post(
            api.endpoint, content=chunks(), headers={"Content-Type": "application/json"}
        )
        within = await client.post(
            api.endpoint, json={"query": "{ plans { id } }", "variables": {"padding": "x" * 1900}}
        )
    assert declared.status_code == 413 and code_of(declared) == "REQUEST_TOO_LARGE"
    assert "content-length" not in streamed.request.headers
    assert streamed.status_code == 413 and code_of(streamed) == "REQUEST_TOO_LARGE"
    assert within.status_code == 200 and len(within.json()["data"]["plans"]) == 4


async def test_the_default_body_limit_is_one_mebibyte(db: Database) -> None:
    assert Settings().max_request_bytes == 1_048_576
    async with serve_api(db) as api, httpx.AsyncClient() as client:
        response = await client.post(
            api.endpoint, json={"query": "{ plans { id } }", "variables": {"x": "y" * 1_048_576}}
        )
    assert response.status_code == 413 and code_of(response) == "REQUEST_TOO_LARGE"


# Batches -----------------------------------------------------------------------------------------


async def test_batched_requests_are_refused(db: Database) -> None:
    async with serve_api(db) as api, httpx.AsyncClient() as client:
        batch = await client.post(api.endpoint, json=[PLANS, PLANS])
        spaced = await client.post(
            api.endpoint,
            content=b'  \n [{"query": "{ plans { id } }"}]',
            headers={"Content-Type": "application/json"},
        )
        single = await client.post(api.endpoint, json=PLANS)
    assert batch.status_code == 400 and code_of(batch) == "BATCH_NOT_SUPPORTED"
    assert spaced.status_code == 400 and code_of(spaced) == "BATCH_NOT_SUPPORTED"
    assert single.status_code == 200


# CORS --------------------------------------------------------------------------------------------


def preflight(origin: str) -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }


async def test_cors_allows_the_app_url_in_development_and_no_other_origin(db: Database) -> None:
    async with serve_api(db) as api, httpx.AsyncClient() as client:
        allowed = await client.post(api.endpoint, json=PLANS, headers={"Origin": APP_ORIGIN})
        allowed_preflight = await client.options(api.endpoint, headers=preflight(APP_ORIGIN))
        other = await client.post(api.endpoint, json=PLANS, headers={"Origin": "https://evil.test"})
        other_preflight = await client.options(api.endpoint, headers=preflight("https://evil.test"))
        refused = await client.post(
            api.endpoint, content=b"query=x", headers={"Origin": APP_ORIGIN, "Content-Type": "text/plain"}
        )
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "x-request-id" in allowed.headers["access-control-expose-headers"]
    assert allowed_preflight.status_code == 200
    assert allowed_preflight.headers["access-control-allow-origin"] == APP_ORIGIN
    allowed_headers = allowed_preflight.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed_headers and "content-type" in allowed_headers
    assert "POST" in allowed_preflight.headers["access-control-allow-methods"]
    assert other.status_code == 200  # the server answers; the browser withholds it from the page
    assert "access-control-allow-origin" not in other.headers
    assert other_preflight.status_code == 400
    assert "access-control-allow-origin" not in other_preflight.headers
    assert refused.status_code == 415 and refused.headers["access-control-allow-origin"] == APP_ORIGIN


async def test_cors_follows_the_allow_list_setting(db: Database) -> None:
    origins = "https://app.example.com, https://admin.example.com:8443"
    async with serve_api(db, cors_allow_origins=origins) as api, httpx.AsyncClient() as client:
        first = await client.post(api.endpoint, json=PLANS, headers={"Origin": "https://app.example.com"})
        second = await client.options(api.endpoint, headers=preflight("https://admin.example.com:8443"))
        app_url = await client.post(api.endpoint, json=PLANS, headers={"Origin": APP_ORIGIN})
    assert first.headers["access-control-allow-origin"] == "https://app.example.com"
    assert second.status_code == 200
    assert second.headers["access-control-allow-origin"] == "https://admin.example.com:8443"
    assert "access-control-allow-origin" not in app_url.headers  # the list replaces the default


async def test_no_origin_is_allowed_in_production_by_default(db: Database) -> None:
    async with serve_api(db, **PRODUCTION) as api, httpx.AsyncClient() as client:
        post = await client.post(api.endpoint, json=PLANS, headers={"Origin": APP_ORIGIN})
        options = await client.options(api.endpoint, headers=preflight(APP_ORIGIN))
    assert post.status_code == 200 and "access-control-allow-origin" not in post.headers
    assert options.status_code == 405 and "access-control-allow-origin" not in options.headers


def test_cors_settings_are_checked() -> None:
    assert Settings(app_url="https://app.example.com/billing").cors_origins == ["https://app.example.com"]
    assert Settings(environment="production", **_production_secrets()).cors_origins == []
    with pytest.raises(ValueError, match="is not an origin"):
        Settings(cors_allow_origins="https://app.example.com/path")
    with pytest.raises(ValueError, match="CORS_ALLOW_ORIGINS is \\* in production"):
        Settings(environment="production", cors_allow_origins="*", **_production_secrets())


def _production_secrets() -> dict[str, str]:
    return {
        "stripe_secret_key": "sk_test_production_like",
        "stripe_webhook_secret": "whsec_production_like_secret",
        "auth_jwt_secret": "a-production-grade-secret-of-40-characters",
        "metrics_token": "a-metrics-token-for-the-scraper-of-40-chars",
    }


async def test_websocket_handshakes_from_other_origins_are_refused(db: Database) -> None:
    token = hs256_token("ws-origin")
    async with serve_api(db) as api, httpx.AsyncClient() as client:
        async with aconnect_ws(
            api.endpoint, client, subprotocols=["graphql-transport-ws"], headers={"Origin": APP_ORIGIN}
        ) as ws:
            await ws.send_json({"type": "connection_init", "payload": {"Authorization": f"Bearer {token}"}})
            assert (await ws.receive_json(timeout=5))["type"] == "connection_ack"
        with pytest.raises(WebSocketUpgradeError) as refused:
            async with aconnect_ws(
                api.endpoint,
                client,
                subprotocols=["graphql-transport-ws"],
                headers={"Origin": "https://evil.test"},
            ):
                pass
    assert refused.value.response.status_code == 403
