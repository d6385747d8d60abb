"""LOG_FORMAT=json: `billing serve`'s every line is one JSON object, a request's lines share its
request id (the caller's X-Request-ID when well-formed, else a new one, echoed either way), and
the GraphQL operation name and the signed-in user's id ride along."""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from billing.logs import ContextFilter, json_formatter, logging_config, request_id_for
from db.engine import Database
from db.migrate import upgrade
from tests.conftest import free_port
from tests.graphql_support import hs256_token, serve_api
from tests.processes import BILLING, wait_ready
from tests.stripe_events import event, post_event


def lines_of(text: str) -> list[dict[str, Any]]:
    parsed = []
    for line in text.splitlines():
        if line.strip():
            try:
                parsed.append(json.loads(line))
            except ValueError:
                pytest.fail(f"a log line is not JSON: {line!r}\nall output:\n{text[-4000:]}")
    return parsed


def test_request_ids_are_honoured_when_well_formed() -> None:
    assert request_id_for("req-42.a:b_c") == "req-42.a:b_c"
    for bad in (None, "", "has space", "x" * 129, "semi;colon", "new\nline"):
        made = request_id_for(bad)
        assert len(made) == 32 and made != bad


def test_the_context_rides_on_json_lines(caplog: pytest.LogCaptureFixture) -> None:
    from billing.logs import OPERATION, REQUEST_ID, USER_ID

    record = logging.LogRecord("billing.test", logging.INFO, __file__, 1, "hello %s", ("there",), None)
    tokens = [REQUEST_ID.set("req-1"), OPERATION.set("Checkout"), USER_ID.set("ada")]
    ContextFilter().filter(record)
    for variable, token in zip((REQUEST_ID, OPERATION, USER_ID), tokens, strict=True):
        variable.reset(token)
    line = json.loads(json_formatter().format(record))
    assert {
        key: line[key] for key in ("level", "logger", "message", "request_id", "operation", "user_id")
    } == {
        "level": "INFO",
        "logger": "billing.test",
        "message": "hello there",
        "request_id": "req-1",
        "operation": "Checkout",
        "user_id": "ada",
    }
    assert line["time"].startswith("20") and "event_id" not in line


def test_production_logs_json_by_default() -> None:
    config = logging_config(as_json=True, level="info")
    assert config["formatters"]["billing"]["()"] is json_formatter
    assert config["root"]["level"] == "INFO"


@pytest.mark.postgres_only
def test_billing_serve_logs_one_json_object_per_line_sharing_request_ids(
    fresh_pg_url: str, tmp_path: Path
) -> None:
    upgrade(fresh_pg_url)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "DATABASE_URL": fresh_pg_url,
        "PUBLIC_BASE_URL": url,
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "INFO",
        "SANDBOX_SYNC_CATALOG": "false",
    }
    log = tmp_path / "serve.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [BILLING, "serve", "--port", str(port)], env=env, cwd=tmp_path, stdout=output, stderr=output
        )
    try:
        wait_ready(url, process, log)
        with httpx.Client(timeout=30) as client:
            rejected = client.post(
                f"{url}/webhooks/stripe",
                content=b"{}",
                headers={"Stripe-Signature": "t=1,v1=00", "X-Request-ID": "req-hook-1"},
            )
            made = client.get(f"{url}/healthz", headers={"X-Request-ID": "not ok; no"})
            viewer = client.post(
                f"{url}/graphql",
                json={"query": "query Me { viewer { id } }", "operationName": "Me"},
                headers={"X-Request-ID": "req-gql-1", "Authorization": f"Bearer {hs256_token('ada')}"},
            )
        assert rejected.status_code == 400 and rejected.headers["x-request-id"] == "req-hook-1"
        assert len(made.headers["x-request-id"]) == 32
        assert viewer.headers["x-request-id"] == "req-gql-1", viewer.text
    finally:
        process.terminate()
        process.wait(timeout=20)
    lines = lines_of(log.read_text())
    for line in lines:
        assert {"time", "level", "logger", "message"} <= line.keys(), line
    hook = [line for line in lines if line.get("request_id") == "req-hook-1"]
    assert {line["logger"] for line in hook} == {"billing.webhooks", "uvicorn.access"}, hook
    assert any("rejected a webhook" in line["message"] for line in hook)
    graphql = [line for line in lines if line.get("request_id") == "req-gql-1"]
    assert graphql and all(line.get("operation") == "Me" for line in graphql), graphql
    assert any(line.get("user_id") == "ada" for line in graphql), graphql
    assert not any(line.get("request_id") == "not ok; no" for line in lines)


async def test_webhook_lines_are_json_and_name_the_request(
    caplog: pytest.LogCaptureFixture, db: Database
) -> None:
    """In process: the same formatter and filter on pytest's handler, for a rejected webhook."""
    caplog.handler.addFilter(ContextFilter())
    caplog.handler.setFormatter(json_formatter())
    caplog.set_level(logging.INFO)
    async with serve_api(db) as api, httpx.AsyncClient() as client:
        hook = event("customer.updated", {"id": "cus_1", "object": "customer"})
        answer = await post_event(client, api.url, hook, secret="whsec_not_ours")
    assert answer.status_code == 400
    lines = lines_of(caplog.text)
    rejected = [line for line in lines if "rejected a webhook" in line["message"]]
    assert [line["request_id"] for line in rejected] == [answer.headers["x-request-id"]]
