"""The front door: what a person opens in a browser. Every asset comes from the service itself.

- `GET /graphql` with `Accept: text/html` (outside production): GraphiQL, from the pinned
  copies in `graph/static/vendor/` (`scripts/vendor-assets`, `vendor.lock.json`) and the start-up
  script `graph/static/graphiql-start.js`; no inline script. In development the page offers "act
  as a test user": `POST /dev/token` (development only) returns a token that the page puts into
  the IDE's request headers, and the IDE opens with an example operation.
- `GET /`: a landing page in development (links to GraphiQL, the API docs, the health routes and
  the sandbox's pages, and the next two steps); a one-line page in production.
- `GET /docs`: Swagger UI (pinned, self-hosted) on `/openapi.json`, when the docs are on
  (`API_DOCS`; default on in development, off in production).
- `/static/...`: those files.

Every HTML page carries a Content-Security-Policy: the tool pages (GraphiQL, the docs) allow
their own origin and inline styles (both tools set `style` attributes from their scripts), the
other pages allow no inline style or script (`PAGE_POLICY`). See docs/front-door.md.
"""

from __future__ import annotations

import html
import re
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pydantic import BaseModel, Field
from starlette.requests import HTTPConnection, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.staticfiles import StaticFiles

from billing.errors import ConfigurationError
from billing.settings import Settings
from graph.auth import issue_dev_token

STATIC_DIR = Path(__file__).with_name("static")
STATIC_PATH = "/static"
DEV_TOKEN_PATH = "/dev/token"
DOCS_PATH = "/docs"
OPENAPI_PATH = "/openapi.json"
DEV_TOKEN_TTL_SECONDS = 3600
DEFAULT_TEST_USER = "demo_user"

_COMMON = "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
TOOL_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; font-src 'self' data:; "
    "img-src 'self' data:; connect-src 'self'{websocket}; " + _COMMON
)
PAGE_POLICY = "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; " + _COMMON
_HOST = re.compile(r"^[A-Za-z0-9.\-]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")

EXAMPLE_OPERATION = """# Press "Act as a test user" above, then run this (Ctrl-Enter or
# the play button): the signed-in user, their subscription, access
# and usage, and the plans on sale.
query Viewer {
  viewer {
    id
    subscription {
      status
      tier
      effectiveTier
      hasAccess
      interval
      currentPeriodEnd
      cancelAtPeriodEnd
    }
    usage(feature: "api_calls") { feature used limit remaining }
  }
  access(feature: "advanced_analytics") {
    allowed
    reason
    effectiveTier
    requiredTier
  }
  plans { id tier interval name amount currency }
}
"""
CHECKOUT_OPERATION = """# A checkout for the test user: run it, then open the returned
# `url` (the sandbox's checkout page) and pay.
mutation Checkout {
  createCheckoutSession(tier: PRO, interval: MONTHLY) { id url }
}
"""
LIVE_OPERATION = """# Live updates: run this, then change the subscription
# (pay a checkout, cancel it in the portal): each change shows here.
subscription Live {
  billingStateChanged {
    status
    tier
    effectiveTier
    hasAccess
    cancelAtPeriodEnd
    currentPeriodEnd
  }
}
"""


def websocket_source(connection: HTTPConnection) -> str:
    """`ws://host[:port]` (or `wss://`) of the service as this request reached it; empty when the
    Host header is not a plain host (the policy then allows `'self'` only)."""
    host = connection.headers.get("host", "")
    if not _HOST.match(host):
        return ""
    scheme = "wss" if connection.url.scheme == "https" else "ws"
    return f" {scheme}://{host}"


def tool_policy(connection: HTTPConnection) -> str:
    return TOOL_POLICY.format(websocket=websocket_source(connection))


def html_page(body: str, policy: str, *, status: int = 200) -> HTMLResponse:
    return HTMLResponse(
        body,
        status_code=status,
        headers={
            "Content-Security-Policy": policy,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-store",
        },
    )


def _root(connection: HTTPConnection) -> str:
    return html.escape(str(connection.scope.get("root_path", "")), quote=True)


def graphiql_page(request: Request, settings: Settings) -> HTMLResponse:
    """GraphiQL from the service's own files; the "act as a test user" bar outside production."""
    root = _root(request)
    static = f"{root}{STATIC_PATH}"
    bar = ""
    data = f'data-graphql-url="{root}/graphql" data-example="{html.escape(EXAMPLE_OPERATION, quote=True)}"'
    if not settings.is_production:
        data += f' data-dev-token-url="{root}{DEV_TOKEN_PATH}"'
        bar = (
            '<header class="front-door-bar"><a href="' + (root or "/") + '">Billing API</a>'
            '<form id="act-as" class="act-as">'
            '<label for="act-as-user">User id</label>'
            f'<input id="act-as-user" name="user" value="{DEFAULT_TEST_USER}" autocomplete="off" '
            'spellcheck="false" required maxlength="200">'
            '<button id="act-as-button" type="submit">Act as a test user</button>'
            '<span id="act-as-status" class="act-as-status" role="status"></span>'
            "</form>"
            '<span class="front-door-note">development only: a token from '
            f"<code>POST {DEV_TOKEN_PATH}</code> goes into the request headers</span></header>"
        )
    document = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        "<title>Billing API · GraphiQL</title>"
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        '<link rel="icon" href="data:,">'
        f'<link rel="stylesheet" href="{static}/vendor/graphiql/graphiql.min.css">'
        f'<link rel="stylesheet" href="{static}/graphiql-page.css">'
        f"</head><body>{bar}"
        f'<div id="graphiql" class="graphiql-host" {data}>Loading GraphiQL…</div>'
        f'<script src="{static}/vendor/react/react.production.min.js"></script>'
        f'<script src="{static}/vendor/react-dom/react-dom.production.min.js"></script>'
        f'<script src="{static}/vendor/graphiql/graphiql.min.js"></script>'
        f'<script src="{static}/graphiql-start.js"></script>'
        "</body></html>"
    )
    return html_page(document, tool_policy(request))


def docs_page(request: Request) -> HTMLResponse:
    """Swagger UI on the OpenAPI document, from the service's own files."""
    root = _root(request)
    static = f"{root}{STATIC_PATH}"
    document = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        "<title>Billing API · REST routes</title>"
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        '<link rel="icon" href="data:,">'
        f'<link rel="stylesheet" href="{static}/vendor/swagger-ui/swagger-ui.css">'
        f'</head><body><div id="swagger-ui" data-openapi-url="{root}{OPENAPI_PATH}"></div>'
        f'<script src="{static}/vendor/swagger-ui/swagger-ui-bundle.js"></script>'
        f'<script src="{static}/swagger-start.js"></script>'
        "</body></html>"
    )
    return html_page(document, tool_policy(request))


def _link(path: str, label: str, note: str = "") -> str:
    note_html = f' <span class="muted">{html.escape(note)}</span>' if note else ""
    return f'<li><a href="{html.escape(path, quote=True)}">{html.escape(label)}</a>{note_html}</li>'


def landing_page(request: Request, settings: Settings, *, docs: bool, sandbox: bool) -> HTMLResponse:
    root = _root(request)
    css = f'<link rel="stylesheet" href="{root}{STATIC_PATH}/front-door.css">'
    head = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>Billing API</title>'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f'<link rel="icon" href="data:,">{css}</head><body><main>'
    )
    if settings.is_production:
        return html_page(
            f"{head}<h1>Billing API</h1><p>GraphQL at <code>/graphql</code>.</p></main></body></html>",
            PAGE_POLICY,
        )
    graphiql = f"{root}/graphql"
    checkout = f"{graphiql}?q={quote(CHECKOUT_OPERATION)}"
    live = f"{graphiql}?q={quote(LIVE_OPERATION)}"
    tools = [
        _link(graphiql, "GraphiQL", "the GraphQL IDE, with “act as a test user” and an example operation")
    ]
    if docs:
        tools.append(
            _link(f"{root}{DOCS_PATH}", "REST API docs", "Swagger UI: webhook, health, sandbox routes")
        )
        tools.append(_link(f"{root}{OPENAPI_PATH}", "OpenAPI document"))
    tools.append(
        _link(
            f"{root}/admin",
            "Admin console",
            "operators only (ADMIN_USER_IDS): revenue, accounts, what is stuck",
        )
    )
    health = [
        _link(f"{root}/healthz", "/healthz", "liveness: the process answers"),
        _link(f"{root}/readyz", "/readyz", "readiness: the database is reachable and migrated"),
    ]
    sandbox_html = (
        "<h2>Stripe sandbox</h2><p>No Stripe key is set, so Stripe is the built-in sandbox at "
        f"<code>{root}/sandbox</code>. Its hosted pages open from the URLs the API returns: "
        f'checkout (<a href="{html.escape(checkout, quote=True)}">createCheckoutSession</a>), '
        "the customer portal (<code>createPortalSession</code>) and each invoice "
        "(<code>viewer.invoices.hostedInvoiceUrl</code>). Its "
        f'<a href="{root}/sandbox/">dashboard</a> shows its customers, subscriptions, invoices and '
        "events, and drives its clock and cards.</p>"
        if sandbox
        else "<h2>Stripe</h2><p>A Stripe key is set: checkout and portal pages are Stripe's.</p>"
    )
    body = (
        f"{head}<h1>Billing API</h1>"
        '<p class="muted">Development. Everything here is served by this process: no internet needed.</p>'
        "<h2>Next steps</h2><ol>"
        f'<li>Open <a href="{graphiql}">GraphiQL</a>, press <strong>Act as a test user</strong> and run '
        "the example operation (the play button): the test user, their subscription, access, usage "
        "and the plans.</li>"
        f'<li>Watch it change: run <a href="{html.escape(live, quote=True)}">the live subscription</a> in '
        f'one tab and <a href="{html.escape(checkout, quote=True)}">a checkout</a> in another, open the '
        "checkout URL and pay: the live tab shows the new subscription.</li></ol>"
        f"<h2>Tools</h2><ul>{''.join(tools)}</ul>"
        f"<h2>Health</h2><ul>{''.join(health)}</ul>"
        f"{sandbox_html}</main></body></html>"
    )
    return html_page(body, PAGE_POLICY)


class DevTokenRequest(BaseModel):
    userId: str = Field(
        default=DEFAULT_TEST_USER, min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.@:\-]+$"
    )
    email: str | None = Field(default=None, max_length=320)


class DevToken(BaseModel):
    token: str
    userId: str
    expiresIn: int


def dev_token_response(settings: Settings, body: DevTokenRequest) -> DevToken | JSONResponse:
    try:
        token = issue_dev_token(
            settings, body.userId, email=body.email, ttl=timedelta(seconds=DEV_TOKEN_TTL_SECONDS)
        )
    except ConfigurationError as exc:
        return JSONResponse({"error": "no development tokens", "reason": str(exc)}, status_code=409)
    return DevToken(token=token, userId=body.userId, expiresIn=DEV_TOKEN_TTL_SECONDS)


class StaticAssets(StaticFiles):
    """The front door's files, marked `nosniff`, cached for an hour."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers.setdefault("Cache-Control", "public, max-age=3600")
        return response


def static_files() -> StaticAssets:
    return StaticAssets(directory=STATIC_DIR)
