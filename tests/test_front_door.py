"""The front door over HTTP: pages and their Content-Security-Policy, the development token route
(absent in production), the OpenAPI document, the pinned assets (tests/test_front_door_browser.py
opens the same pages in Chromium)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import httpx
import pytest

from db.engine import Database
from graph.front_door import PAGE_POLICY, STATIC_DIR
from tests.front_door_server import dev_service
from tests.graphql_support import PRODUCTION, PRODUCTION_SECRET, serve_api

ROOT = Path(__file__).resolve().parent.parent
HTML = {"Accept": "text/html"}
TOOL_POLICY_START = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; font-src 'self' data:; "
    "img-src 'self' data:; connect-src 'self' ws://127.0.0.1:"
)
TOOL_POLICY_END = "; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with dev_service(tmp_path_factory.mktemp("front-door")) as url:
        yield url


def assert_self_contained(page: httpx.Response, base: str) -> None:
    """No inline script or style, nothing referenced on another origin."""
    text = page.text
    assert "<style" not in text and " style=" not in text
    for tag in re.findall(r"<script\b[^>]*>", text):
        assert " src=" in tag, tag
    for url in re.findall(r'(?:src|href)="([^"]+)"', text):
        assert not re.match(r"^(https?:)?//", url) or url.startswith(base), url


def assert_tool_policy(page: httpx.Response, url: str) -> None:
    policy = page.headers["content-security-policy"]
    port = url.rsplit(":", 1)[1]
    assert policy == f"{TOOL_POLICY_START}{port}{TOOL_POLICY_END}"


def test_graphiql_and_the_docs_come_from_the_service_under_the_tool_policy(service: str) -> None:
    graphiql = httpx.get(f"{service}/graphql", headers=HTML)
    docs = httpx.get(f"{service}/docs")
    for page in (graphiql, docs):
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert_tool_policy(page, service)
        assert_self_contained(page, service)
        for asset in re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text):
            answer = httpx.get(f"{service}{asset}")
            assert answer.status_code == 200, asset
            assert answer.headers["x-content-type-options"] == "nosniff"
    assert "/static/vendor/graphiql/graphiql.min.js" in graphiql.text
    assert 'id="act-as-button"' in graphiql.text and 'data-dev-token-url="/dev/token"' in graphiql.text
    assert "/static/vendor/swagger-ui/swagger-ui-bundle.js" in docs.text


def test_the_landing_page_and_the_sandbox_pages_allow_no_inline_style(service: str) -> None:
    landing = httpx.get(f"{service}/")
    assert landing.headers["content-security-policy"] == PAGE_POLICY
    assert "'unsafe-inline'" not in PAGE_POLICY
    assert_self_contained(landing, service)
    for link in ("/graphql", "/docs", "/openapi.json", "/healthz", "/readyz", "/sandbox"):
        assert f'"{link}' in landing.text or f">{link}<" in landing.text or f"<code>{link}" in landing.text
    missing = httpx.get(f"{service}/sandbox/checkout/cs_test_missing")
    assert missing.status_code == 404
    sandbox_policy = missing.headers["content-security-policy"]
    assert "'unsafe-inline'" not in sandbox_policy and "default-src 'none'" in sandbox_policy
    assert_self_contained(missing, service)
    css = httpx.get(f"{service}/sandbox/pages.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")


def test_act_as_a_test_user_gets_a_token_that_graphql_accepts(service: str) -> None:
    issued = httpx.post(f"{service}/dev/token", json={"userId": "front_door_user"})
    assert issued.status_code == 200
    body = issued.json()
    assert body["userId"] == "front_door_user" and body["expiresIn"] == 3600
    viewer = httpx.post(
        f"{service}/graphql",
        json={"query": "{ viewer { id } }"},
        headers={"Authorization": f"Bearer {body['token']}"},
    )
    assert viewer.json() == {"data": {"viewer": {"id": "front_door_user"}}}
    assert httpx.post(f"{service}/dev/token", json={"userId": "no spaces <here>"}).status_code == 422


def test_the_openapi_document_lists_the_rest_routes(service: str) -> None:
    document: dict[str, Any] = httpx.get(f"{service}/openapi.json").json()
    paths = document["paths"]
    webhook = paths["/webhooks/stripe"]["post"]
    assert webhook["parameters"] == [
        {
            "name": "Stripe-Signature",
            "in": "header",
            "required": True,
            "description": webhook["parameters"][0]["description"],
            "schema": {"type": "string"},
        }
    ]
    assert set(webhook["responses"]) == {"200", "400", "413", "503"}
    assert set(paths["/readyz"]["get"]["responses"]) >= {"200", "503"}
    assert "get" in paths["/healthz"]
    assert "post" in paths["/dev/token"]
    for control in ("/sandbox/_control/clock/advance", "/sandbox/_control/checkout/{session_id}/complete"):
        assert "post" in paths[control], control
    assert "get" in paths["/sandbox/checkout/{session_id}"]
    assert not any(path.startswith("/sandbox/v1") for path in paths)  # Stripe's API: Stripe documents it


async def test_production_has_no_token_route_no_button_and_no_docs(db: Database) -> None:
    async with serve_api(db, **PRODUCTION) as api, httpx.AsyncClient() as client:
        token = await client.post(f"{api.url}/dev/token", json={"userId": "demo_user"})
        graphiql = await client.get(api.endpoint, headers=HTML)
        landing = await client.get(f"{api.url}/")
        docs = await client.get(f"{api.url}/docs")
        openapi = await client.get(f"{api.url}/openapi.json")
    assert token.status_code in (404, 405)
    assert graphiql.status_code == 404 and "act-as" not in graphiql.text
    assert landing.status_code == 200 and landing.headers["content-security-policy"] == PAGE_POLICY
    assert "/graphql" in landing.text and "<a " not in landing.text and "token" not in landing.text
    assert docs.status_code == 404 and openapi.status_code == 404


async def test_api_docs_turns_the_docs_on_in_production(db: Database) -> None:
    async with serve_api(db, **PRODUCTION, api_docs=True) as api, httpx.AsyncClient() as client:
        docs = await client.get(f"{api.url}/docs")
        openapi = (await client.get(f"{api.url}/openapi.json")).json()
        token = await client.post(f"{api.url}/dev/token", json={"userId": "demo_user"})
    assert docs.status_code == 200 and "swagger-ui-bundle.js" in docs.text
    assert "/webhooks/stripe" in openapi["paths"] and "/dev/token" not in openapi["paths"]
    assert token.status_code in (404, 405)
    assert PRODUCTION_SECRET  # the production settings of tests/test_security_lockdown.py


def test_the_vendored_files_match_their_lock() -> None:
    checked = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "vendor-assets"), "--check"], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stderr
    for package in ("react", "react-dom", "graphiql", "swagger-ui"):
        assert (STATIC_DIR / "vendor" / package / "LICENSE").is_file()


def test_every_static_file_is_package_data() -> None:
    """An installed wheel serves the same files: each is matched by a package-data glob."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for package, folder in (("graph", ROOT / "graph"), ("stripe_sandbox", ROOT / "stripe_sandbox")):
        globs = config[package]
        for path in folder.rglob("*"):
            if path.is_file() and path.suffix in {".js", ".css", ".json", ".txt", ""}:
                relative = path.relative_to(folder).as_posix()
                if relative.startswith(("static/", "control/")) and "__pycache__" not in relative:
                    assert any(fnmatch(relative, pattern) for pattern in globs), relative
