"""A webhook endpoint for tests: records every delivery it gets, answers what the test says.

    async with run_receiver() as receiver:
        ...  # point the sandbox's webhook_url at receiver.url
        await receiver.wait_for(lambda r: len(r.deliveries) >= 1)
        delivery = receiver.deliveries[0]  # raw body, headers, parsed event

`receiver.respond` decides each answer: a status code, or an async callable taking the
`Delivery` and returning one (it may call back into the sandbox while the sender waits).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from tests.conftest import free_port, serve

WEBHOOK_PATH = "/webhooks/stripe"


@dataclass(frozen=True)
class Delivery:
    body: bytes
    headers: dict[str, str]  # lower-cased names
    event: dict[str, Any]
    received_at: float  # real unix time
    status: int = 0  # what the receiver answered

    @property
    def event_id(self) -> str:
        return str(self.event.get("id"))

    @property
    def signature(self) -> str:
        return self.headers.get("stripe-signature", "")

    @property
    def signed_at(self) -> int:
        """The `t=` of the `Stripe-Signature` header."""
        parts = dict(part.split("=", 1) for part in self.signature.split(",") if "=" in part)
        return int(parts["t"])


Responder = int | Callable[[Delivery], Awaitable[int]]


@dataclass
class WebhookReceiver:
    url: str = ""
    respond: Responder = 200
    deliveries: list[Delivery] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)  # raised by a `respond` callable

    @property
    def event_ids(self) -> list[str]:
        """Ids in arrival order, duplicates included."""
        return [delivery.event_id for delivery in self.deliveries]

    def of_type(self, event_type: str) -> list[Delivery]:
        return [d for d in self.deliveries if d.event.get("type") == event_type]

    async def wait_for(self, condition: Callable[[WebhookReceiver], bool], within: float = 10.0) -> None:
        deadline = time.monotonic() + within
        while not condition(self):
            if self.errors:
                raise AssertionError(f"the receiver's handler failed: {self.errors!r}")
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"timed out after {within}s; received {len(self.deliveries)}: {self.event_ids}"
                )
            await asyncio.sleep(0.02)

    async def settle(self, quiet: float = 0.5, within: float = 10.0) -> None:
        """Wait until nothing has arrived for `quiet` seconds (to check nothing more comes)."""
        deadline = time.monotonic() + within
        seen = -1
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            if len(self.deliveries) != seen:
                seen, quiet_since = len(self.deliveries), time.monotonic()
            elif time.monotonic() - quiet_since >= quiet:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"deliveries kept arriving for {within}s")

    async def _handle(self, request: Request) -> Response:
        body = await request.body()
        headers = {name.lower(): value for name, value in request.headers.items()}
        try:
            event = json.loads(body)
        except ValueError:
            event = {}
        delivery = Delivery(body=body, headers=headers, event=event, received_at=time.time())
        status = 500
        try:
            status = self.respond if isinstance(self.respond, int) else await self.respond(delivery)
        except Exception as exc:
            self.errors.append(exc)
        self.deliveries.append(
            Delivery(delivery.body, delivery.headers, delivery.event, delivery.received_at, status)
        )
        return PlainTextResponse("ok" if 200 <= status < 300 else "nope", status_code=status)

    def app(self) -> Starlette:
        return Starlette(routes=[Route(WEBHOOK_PATH, self._handle, methods=["POST"])])


@asynccontextmanager
async def run_receiver(respond: Responder = 200) -> AsyncIterator[WebhookReceiver]:
    """A receiver served on a free loopback port; its `url` is the full endpoint URL."""
    port = free_port()
    receiver = WebhookReceiver(url=f"http://127.0.0.1:{port}{WEBHOOK_PATH}", respond=respond)
    async with serve(receiver.app(), port):
        yield receiver
