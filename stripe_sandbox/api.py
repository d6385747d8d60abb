"""Endpoints of the emulated Stripe API and the helpers every resource uses.

A resource module declares its endpoints with the `endpoint` decorator:

    @endpoint("POST", "/v1/customers", CustomerCreateParams)
    async def create_customer(call: Call) -> dict[str, Any]:
        ...

The handler runs inside one sandbox transaction (`call.tx`) with parameters already validated
against the SDK's typed params. The app (`stripe_sandbox.app`) adds what every Stripe request
gets: API-key auth, fault injection, `Idempotency-Key` replay, `expand[]`, `Request-Id`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import Response

from stripe_sandbox.errors import StripeError, parameter_invalid, resource_missing
from stripe_sandbox.store import Transaction


@dataclass(frozen=True)
class SandboxConfig:
    """What the sandbox needs from its host: nothing else of the service is visible to it."""

    database_url: str
    schema: str | None = None
    public_base_url: str = "http://127.0.0.1:8000"  # hosted pages and webhook delivery
    mount_path: str = "/sandbox"
    webhook_path: str = "/webhooks/stripe"
    webhook_secret: str = ""
    webhook_url: str | None = None  # default: public_base_url + webhook_path
    deliver_webhooks: bool = True
    dunning_final_action: str = "cancel"  # or "unpaid", as Stripe's dashboard allows

    @property
    def base_url(self) -> str:
        return f"{self.public_base_url}{self.mount_path}"

    @property
    def endpoint_url(self) -> str:
        """Where events are delivered."""
        return self.webhook_url or f"{self.public_base_url}{self.webhook_path}"


@dataclass
class Call:
    tx: Transaction
    params: dict[str, Any]
    path: dict[str, str]
    config: SandboxConfig
    url: str  # the request path below the mount, e.g. "/v1/customers"


Handler = Callable[[Call], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    params: type | None
    handler: Handler


ENDPOINTS: list[Endpoint] = []


def endpoint(method: str, path: str, params: type | None = None) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        ENDPOINTS.append(Endpoint(method, path, params, handler))
        return handler

    return register


# Control routes (tests and demos) ---------------------------------------------------------------


class SandboxHost(Protocol):
    """What a control route may use of the running sandbox."""

    config: SandboxConfig

    def transaction(self) -> AbstractAsyncContextManager[Transaction]:
        """A write transaction; events it emits are handed to delivery after commit."""
        ...


ControlHandler = Callable[[SandboxHost, Request], Awaitable[Response]]


@dataclass(frozen=True)
class ControlRoute:
    method: str
    path: str  # below the mount, e.g. "/_control/clock/advance"
    handler: ControlHandler


CONTROL_ROUTES: list[ControlRoute] = []


def control(method: str, path: str) -> Callable[[ControlHandler], ControlHandler]:
    def register(handler: ControlHandler) -> ControlHandler:
        CONTROL_ROUTES.append(ControlRoute(method, path, handler))
        return handler

    return register


# Lists ----------------------------------------------------------------------------------------


@dataclass
class Page:
    data: list[dict[str, Any]]
    has_more: bool
    extra: dict[str, Any] = field(default_factory=dict)


def paginate(items: list[dict[str, Any]], params: dict[str, Any], url: str) -> dict[str, Any]:
    """Stripe's cursor pagination over `items` (already newest first)."""
    limit = int(params.get("limit", 10))
    if not 1 <= limit <= 100:
        raise parameter_invalid("limit", "Invalid limit: must be between 1 and 100")
    start = 0
    if after := params.get("starting_after"):
        index = _index_of(items, after, "starting_after")
        start = index + 1
        page = items[start : start + limit]
        has_more = start + limit < len(items)
    elif before := params.get("ending_before"):
        index = _index_of(items, before, "ending_before")
        begin = max(0, index - limit)
        page = items[begin:index]
        has_more = begin > 0
    else:
        page = items[:limit]
        has_more = limit < len(items)
    return {"object": "list", "data": page, "has_more": has_more, "url": url}


def _index_of(items: list[dict[str, Any]], object_id: str, param: str) -> int:
    for index, item in enumerate(items):
        if item["id"] == object_id:
            return index
    raise resource_missing("object", object_id, param)


def created_filter(params: dict[str, Any]) -> Callable[[dict[str, Any]], bool]:
    """The `created` filter of list endpoints: an exact int or a {gt, gte, lt, lte} range."""
    condition = params.get("created")
    if condition is None:
        return lambda _obj: True
    if isinstance(condition, int):
        return lambda obj: obj.get("created") == condition
    bounds = {key: int(value) for key, value in condition.items()}

    def check(obj: dict[str, Any]) -> bool:
        created = int(obj.get("created", 0))
        return (
            ("gt" not in bounds or created > bounds["gt"])
            and ("gte" not in bounds or created >= bounds["gte"])
            and ("lt" not in bounds or created < bounds["lt"])
            and ("lte" not in bounds or created <= bounds["lte"])
        )

    return check


def search_result(items: list[dict[str, Any]], params: dict[str, Any], url: str) -> dict[str, Any]:
    limit = int(params.get("limit", 10))
    return {
        "object": "search_result",
        "data": items[:limit],
        "has_more": len(items) > limit,
        "next_page": None,
        "url": url,
    }


def search_matcher(query: str) -> Callable[[dict[str, Any]], bool]:
    """A subset of Stripe's search language: `field:'value'` and `metadata['k']:'v'`, AND-ed."""
    import re

    terms: list[Callable[[dict[str, Any]], bool]] = []
    for clause in re.split(r"\s+AND\s+", query.strip(), flags=re.IGNORECASE):
        match = re.fullmatch(r"metadata\[['\"](.+?)['\"]\]\s*:\s*['\"](.*)['\"]", clause)
        if match:
            key, value = match.groups()
            terms.append(_metadata_equals(key, value))
            continue
        match = re.fullmatch(r"(\w+)\s*:\s*['\"](.*)['\"]", clause)
        if match is None:
            raise parameter_invalid("query", f"Invalid search query: {clause}")
        name, value = match.groups()
        terms.append(_field_equals(name, value))
    return lambda obj: all(term(obj) for term in terms)


def _metadata_equals(key: str, value: str) -> Callable[[dict[str, Any]], bool]:
    return lambda obj: (obj.get("metadata") or {}).get(key) == value


def _field_equals(name: str, value: str) -> Callable[[dict[str, Any]], bool]:
    return lambda obj: str(obj.get(name)) == value


# Expansion ------------------------------------------------------------------------------------


async def expand(tx: Transaction, obj: dict[str, Any], paths: list[str]) -> dict[str, Any]:
    """Replace id strings at the dotted `paths` by the objects they name (Stripe's `expand[]`)."""
    for path in paths:
        await _expand_path(tx, obj, path.split("."))
    return obj


async def _expand_path(tx: Transaction, node: Any, parts: list[str]) -> None:
    if not parts or node is None:
        return
    if isinstance(node, list):
        for item in node:
            await _expand_path(tx, item, parts)
        return
    if not isinstance(node, dict):
        return
    key, rest = parts[0], parts[1:]
    value = node.get(key)
    if isinstance(value, list) and any(isinstance(item, str) for item in value):
        # A list of ids (a subscription's `discounts`): each id expanded, then the rest of the path.
        node[key] = value = [
            (await tx.find(item) or item) if isinstance(item, str) else item for item in value
        ]
        for item in value:
            await _expand_path(tx, item, rest)
        return
    if isinstance(value, str) and not rest:
        found = await tx.find(value)
        if found is not None:
            node[key] = found
        return
    if isinstance(value, str):
        found = await tx.find(value)
        if found is None:
            return
        node[key] = value = found
    await _expand_path(tx, value, rest)


def apply_metadata(current: dict[str, str], update: Any) -> dict[str, str]:
    """Stripe's metadata update: '' clears all, a key set to '' is removed, others merge."""
    if update == "" or update is None:
        return {} if update == "" else current
    merged = dict(current)
    for key, value in update.items():
        if value == "":
            merged.pop(key, None)
        else:
            merged[key] = str(value)
    return merged


__all__ = [
    "CONTROL_ROUTES",
    "ENDPOINTS",
    "Call",
    "Endpoint",
    "SandboxConfig",
    "SandboxHost",
    "StripeError",
    "apply_metadata",
    "control",
    "created_filter",
    "endpoint",
    "expand",
    "paginate",
    "search_matcher",
    "search_result",
]
