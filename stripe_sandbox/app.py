"""The sandbox as an ASGI app: Stripe's API under `/v1`, test controls under `/_control`."""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import json
import logging
import pkgutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qsl

from sqlalchemy import delete, insert, select, update
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from stripe_sandbox import control, resources
from stripe_sandbox.api import CONTROL_ROUTES, ENDPOINTS, Call, Endpoint, SandboxConfig, expand
from stripe_sandbox.delivery import Deliverer
from stripe_sandbox.errors import StripeError, card_declined
from stripe_sandbox.params import parse_form, validate
from stripe_sandbox.store import Store, Transaction, faults, idempotency, new_id

log = logging.getLogger("stripe_sandbox")

IDEMPOTENCY_TTL_SECONDS = 24 * 3600
DEFAULT_TIMEOUT_FAULT_SECONDS = 30.0
FAULT_STATUSES = {"500", "429", "402", "timeout", "reset"}

EventsHook = Callable[[list[dict[str, Any]]], Awaitable[None]]


def _load_resources() -> None:
    """Import every module that registers endpoints or control routes."""
    for package in (resources, control):
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package.__name__}.{module.name}")


class Sandbox:
    """One process's sandbox: its store, its ASGI app, and hooks run after events commit."""

    def __init__(self, config: SandboxConfig) -> None:
        _load_resources()
        self.config = config
        self.store = Store(config.database_url, schema=config.schema)
        self.events_committed: list[EventsHook] = []
        self.background: list[Callable[[], Coroutine[Any, Any, None]]] = []
        self._tasks: list[asyncio.Task[None]] = []
        # Webhook delivery from the outbox: kicked after each commit, polled in the background.
        self.delivery = Deliverer(self.store, config)
        self.events_committed.append(self.delivery.kick)
        self.background.append(self.delivery.run)
        self.app = Starlette(routes=self._routes())

    async def start(self) -> None:
        await self.store.create_tables()
        self._tasks = [asyncio.create_task(job()) for job in self.background]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.store.dispose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)

    def control_routes(self) -> list[tuple[str, str, str]]:
        """(method, path below the mount, summary) of the control routes and hosted pages, for
        the host's API docs (the `/v1` routes are Stripe's API: Stripe documents them)."""
        described = [
            ("POST", "/_control/faults", self._add_fault.__doc__ or "Inject a fault into the next calls."),
            ("DELETE", "/_control/faults", self._clear_faults.__doc__ or "Clear the injected faults."),
        ]
        for route in CONTROL_ROUTES:
            doc = (route.handler.__doc__ or "").strip()
            summary = doc.splitlines()[0] if doc else route.handler.__name__.replace("_", " ")
            described.append((route.method, route.path, summary))
        return described

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """A write transaction; the events it emits go to the hooks once it has committed."""
        async with self.store.transaction() as tx:
            yield tx
        await self.committed(tx.emitted)

    async def committed(self, emitted: list[dict[str, Any]]) -> None:
        if emitted:
            for hook in self.events_committed:
                await hook(emitted)

    # Routes --------------------------------------------------------------------------------

    def _routes(self) -> list[BaseRoute]:
        routes: list[BaseRoute] = [
            Route("/_control/faults", self._add_fault, methods=["POST"]),
            Route("/_control/faults", self._clear_faults, methods=["DELETE"]),
        ]
        for route in CONTROL_ROUTES:
            routes.append(Route(route.path, _control_endpoint(self, route.handler), methods=[route.method]))
        by_path: dict[str, list[Endpoint]] = {}
        for spec in ENDPOINTS:
            by_path.setdefault(spec.path, []).append(spec)
        # Literal paths first: `/v1/customers/search` must not be taken for an id.
        for path, specs in sorted(by_path.items(), key=lambda item: item[0].count("{")):
            routes.append(Route(path, _EndpointApp(self, specs), methods=[s.method for s in specs]))
        return routes

    async def _add_fault(self, request: Request) -> Response:
        body = await request.json()
        status = str(body.get("status"))
        if status not in FAULT_STATUSES or not str(body.get("path_prefix", "")).startswith("/v1"):
            return JSONResponse(
                {"error": f"status must be one of {sorted(FAULT_STATUSES)}; path_prefix must start with /v1"},
                status_code=400,
            )
        async with self.store.transaction() as tx:
            await tx.conn.execute(
                insert(faults).values(
                    path_prefix=body["path_prefix"],
                    status=status,
                    code=body.get("code"),
                    after_apply=bool(body.get("after_apply", False)),
                    remaining=int(body.get("count", 1)),
                    seconds=float(body.get("seconds", DEFAULT_TIMEOUT_FAULT_SECONDS)),
                )
            )
        return JSONResponse({"ok": True})

    async def _clear_faults(self, request: Request) -> Response:
        async with self.store.transaction() as tx:
            await tx.conn.execute(delete(faults))
        return JSONResponse({"ok": True})

    # Requests ------------------------------------------------------------------------------

    async def handle(self, spec: Endpoint, request: Request) -> Response | _Fault:
        request_id = new_id("req")
        try:
            _authenticate(request)
            raw = await _raw_params(request)
            params = validate(spec.params, raw)
            fault = await self._take_fault(request.url.path)
            if fault is not None and not fault.after_apply:
                return fault
            key = request.headers.get("idempotency-key") if request.method == "POST" else None
            status, body, replayed = await self._execute(spec, request, params, key)
        except StripeError as error:
            return _json(error.status, error.body(), request_id, error.headers)
        if fault is not None:
            return fault  # the change happened; only the response is lost
        headers = {"Idempotent-Replayed": "true"} if replayed else {}
        if key:
            headers["Idempotency-Key"] = key
        return _json(status, body, request_id, headers)

    async def _execute(
        self, spec: Endpoint, request: Request, params: dict[str, Any], key: str | None
    ) -> tuple[int, dict[str, Any], bool]:
        fingerprint = _fingerprint(request.method, request.url.path, params)
        emitted: list[dict[str, Any]] = []
        try:
            async with self.store.transaction() as tx:
                if key is not None:
                    stored = await _stored_response(tx, key, fingerprint)
                    if stored is not None:
                        return stored[0], stored[1], True
                call = Call(tx, params, dict(request.path_params), self.config, _below_mount(request))
                body = await spec.handler(call)
                body = await expand(tx, body, list(params.get("expand", [])))
                if key is not None:
                    await _store_response(tx, key, fingerprint, 200, body)
                emitted = tx.emitted
        except StripeError as error:
            if key is not None and error.status < 500:
                # Stripe saves the result of a request that started executing, errors included.
                async with self.store.transaction() as tx:
                    if await _stored_response(tx, key, fingerprint) is None:
                        await _store_response(tx, key, fingerprint, error.status, error.body())
            raise
        await self.committed(emitted)
        return 200, body, False

    async def _take_fault(self, path: str) -> _Fault | None:
        below = path.split(self.config.mount_path, 1)[-1] if self.config.mount_path else path
        async with self.store.transaction() as tx:
            rows = await tx.conn.execute(select(faults).where(faults.c.remaining > 0).order_by(faults.c.seq))
            for row in rows:
                if below.startswith(row.path_prefix):
                    await tx.conn.execute(
                        update(faults).where(faults.c.seq == row.seq).values(remaining=row.remaining - 1)
                    )
                    return _Fault(row.status, row.code, row.after_apply, row.seconds)
        return None


def _control_endpoint(sandbox: Sandbox, handler: Any) -> Callable[[Request], Awaitable[Response]]:
    async def run(request: Request) -> Response:
        try:
            response: Response = await handler(sandbox, request)
        except StripeError as error:
            return _json(error.status, error.body(), new_id("req"), error.headers)
        return response

    return run


class _EndpointApp:
    """Routes one path to the endpoint of the request's method, at the raw ASGI level."""

    def __init__(self, sandbox: Sandbox, specs: list[Endpoint]) -> None:
        self.sandbox = sandbox
        self.specs = {spec.method: spec for spec in specs}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        result = await self.sandbox.handle(self.specs[request.method], request)
        if isinstance(result, _Fault):
            await result.respond(send)
        else:
            await result(scope, receive, send)


class _Fault:
    """An injected failure: an error status, a slow answer, or a dropped connection."""

    def __init__(self, status: str, code: str | None, after_apply: bool, seconds: float | None) -> None:
        self.seconds = DEFAULT_TIMEOUT_FAULT_SECONDS if seconds is None else seconds
        self.status = status
        self.code = code
        self.after_apply = after_apply

    async def respond(self, send: Send) -> None:
        if self.status == "reset":
            # Promise a body and close without it: the client sees the connection drop.
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-length", b"1000")],
                }
            )
            await send({"type": "http.response.body", "body": b"{", "more_body": False})
            return
        if self.status == "timeout":
            await asyncio.sleep(self.seconds)
            error = StripeError(500, "The sandbox timed out (injected fault).", type="api_error")
        elif self.status == "429":
            error = StripeError(
                429,
                "Too many requests hit the API too quickly (injected fault).",
                code="rate_limit",
            )
        elif self.status == "402":
            error = (
                card_declined()
                if self.code in (None, "card_declined")
                else StripeError(402, "Your card could not be charged.", type="card_error", code=self.code)
            )
        else:
            error = StripeError(500, "An unexpected error occurred (injected fault).", type="api_error")
        response = _json(error.status, error.body(), new_id("req"), error.headers)
        await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> dict[str, Any]:  # pragma: no cover - responses never read
    return {"type": "http.disconnect"}


def _authenticate(request: Request) -> None:
    header = request.headers.get("authorization", "")
    key = header.removeprefix("Bearer ").strip()
    if not key.startswith(("sk_test_", "rk_test_")):
        raise StripeError(
            401,
            "Invalid API Key provided: the sandbox accepts test-mode keys (sk_test_...) only.",
            type="invalid_request_error",
        )


async def _raw_params(request: Request) -> dict[str, Any]:
    if request.method == "POST":
        body = (await request.body()).decode()
        return parse_form(parse_qsl(body, keep_blank_values=True))
    return parse_form(parse_qsl(request.url.query, keep_blank_values=True))


def _below_mount(request: Request) -> str:
    return str(request.scope.get("path", request.url.path)).removeprefix(request.scope.get("root_path", ""))


def _fingerprint(method: str, path: str, params: dict[str, Any]) -> str:
    canonical = json.dumps([method, path, params], sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


async def _stored_response(tx: Transaction, key: str, fingerprint: str) -> tuple[int, dict[str, Any]] | None:
    row = (await tx.conn.execute(select(idempotency).where(idempotency.c.key == key))).first()
    if row is None:
        return None
    if row.created < time.time() - IDEMPOTENCY_TTL_SECONDS:
        await tx.conn.execute(delete(idempotency).where(idempotency.c.key == key))
        return None
    if row.fingerprint != fingerprint:
        raise StripeError(
            400,
            "Keys for idempotent requests can only be used with the same parameters they were "
            f"first used with. Try using a key other than '{key}' if you meant to execute a "
            "different request.",
            type="idempotency_error",
            code="idempotency_key_in_use",
        )
    return int(row.status), json.loads(row.body)


async def _store_response(
    tx: Transaction, key: str, fingerprint: str, status: int, body: dict[str, Any]
) -> None:
    await tx.conn.execute(
        insert(idempotency).values(
            key=key,
            fingerprint=fingerprint,
            status=status,
            body=json.dumps(body),
            created=int(time.time()),
        )
    )


def _json(
    status: int, body: dict[str, Any], request_id: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers={"Request-Id": request_id, **(headers or {})})
