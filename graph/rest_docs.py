"""The front door's routes on the app, and the OpenAPI document of the REST routes.

`install_front_door(app, settings, sandbox_routes)` adds `/`, `/static`, `/dev/token`
(development only) and `/docs` (when `settings.docs_enabled`), and makes `app.openapi()` list
the REST routes: FastAPI's own (health, readiness, the development token), plus the webhook route
(a plain Starlette route, answered before FastAPI: described here by hand) and, in sandbox mode,
the sandbox's control routes and hosted pages.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount

from billing.settings import Settings
from graph.front_door import (
    DEV_TOKEN_PATH,
    DOCS_PATH,
    STATIC_PATH,
    DevToken,
    DevTokenRequest,
    dev_token_response,
    docs_page,
    landing_page,
    static_files,
)

SandboxRoutes = Sequence[tuple[str, str, str]]  # (method, path below /sandbox, summary)

_ERROR = {"type": "object", "properties": {"error": {"type": "string"}, "reason": {"type": "string"}}}

WEBHOOK_OPERATION: dict[str, Any] = {
    "post": {
        "tags": ["webhooks"],
        "summary": "Stripe's webhook events",
        "description": (
            "Stripe calls this route. The signature is checked on the raw body before anything is "
            "parsed; the event is stored once in the `stripe_event` inbox and processed by the "
            "worker (docs/webhooks.md)."
        ),
        "operationId": "stripe_webhook",
        "parameters": [
            {
                "name": "Stripe-Signature",
                "in": "header",
                "required": True,
                "description": "`t=<unix time>,v1=<HMAC-SHA256 of t.body>` signed with a secret of "
                "STRIPE_WEBHOOK_SECRET (several during a rotation).",
                "schema": {"type": "string"},
            }
        ],
        "requestBody": {
            "required": True,
            "description": "A Stripe event, at most 1,000,000 bytes.",
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
        "responses": {
            "200": {
                "description": "Stored (or already stored: `duplicate`).",
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "received": {"type": "boolean"},
                                "duplicate": {"type": "boolean"},
                            },
                        }
                    }
                },
            },
            "400": {
                "description": "A missing or bad signature, an old timestamp, or not an event.",
                "content": {"application/json": {"schema": _ERROR}},
            },
            "413": {
                "description": "The body is larger than 1,000,000 bytes.",
                "content": {"application/json": {"schema": _ERROR}},
            },
            "503": {
                "description": "The database cannot store the event now: Stripe retries.",
                "content": {"application/json": {"schema": _ERROR}},
            },
        },
    }
}


def _sandbox_paths(routes: SandboxRoutes) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for method, path, summary in routes:
        parameters = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in _path_names(path)
        ]
        page = not path.startswith("/_control")
        responses: dict[str, Any] = {
            "200": {"description": "An HTML page." if page and method == "GET" else "Done (JSON)."},
            "404": {"description": "No such object in the sandbox."},
        }
        if page and method == "POST":
            responses = {"303": {"description": "Done: on to the next page."}, **responses}
        paths.setdefault(f"/sandbox{path}", {})[method.lower()] = {
            "tags": ["sandbox pages" if page else "sandbox control"],
            "summary": summary,
            "operationId": f"sandbox_{method.lower()}_{_slug(path)}",
            "parameters": parameters,
            "responses": responses,
        }
    return paths


def _path_names(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{") and part.endswith("}")]


def _slug(path: str) -> str:
    return "_".join(part.strip("{}") for part in path.split("/") if part) or "root"


def install_front_door(app: FastAPI, settings: Settings, sandbox_routes: SandboxRoutes | None) -> None:
    """The landing page, the static files, the development token route and the docs (module docstring)."""
    docs = settings.docs_enabled
    sandbox = sandbox_routes is not None

    @app.get("/", include_in_schema=False, response_class=HTMLResponse)
    async def landing(request: Request) -> Response:
        return landing_page(request, settings, docs=docs, sandbox=sandbox)

    app.router.routes.append(Mount(STATIC_PATH, app=static_files(), name="static"))

    if not settings.is_production:

        @app.post(
            DEV_TOKEN_PATH,
            tags=["development"],
            summary="A development user token (development only)",
            description="What `billing token` prints, for GraphiQL's “act as a test user”: an HS256 "
            "token signed with AUTH_JWT_SECRET for `userId`, valid one hour. The route does not "
            "exist in production. 409 when user tokens come from an identity provider (AUTH_JWKS_URL).",
            response_model=DevToken,
            responses={409: {"description": "No AUTH_JWT_SECRET: no development tokens."}},
        )
        async def dev_token(
            body: DevTokenRequest,
        ) -> DevToken | JSONResponse:
            return dev_token_response(settings, body)

    if docs:

        @app.get(DOCS_PATH, include_in_schema=False, response_class=HTMLResponse)
        async def api_docs(request: Request) -> Response:
            return docs_page(request)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title,
                version=app.version,
                description="The REST routes beside GraphQL (`/graphql`, described by its own schema).",
                routes=app.routes,
            )
            paths = document.setdefault("paths", {})
            paths["/webhooks/stripe"] = WEBHOOK_OPERATION
            if sandbox_routes is not None:
                paths.update(_sandbox_paths(sandbox_routes))
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
