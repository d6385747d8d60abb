"""A host app's webhook endpoint for tests: verifies every delivery with `standardwebhooks`.

    async with run_host_receiver(SECRET) as receiver:
        ...  # HOST_WEBHOOK_URL=receiver.url
        await receiver.wait_for(lambda r: len(r.verified) >= 1)

`respond` decides each answer: a status, or (status, headers), or a callable of the delivery
returning either. Every request is verified with the library's own verifier first; one that
fails verification is recorded in `rejected` and answered 400.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from standardwebhooks import Webhook
from standardwebhooks.exceptions import WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from tests.conftest import free_port, serve

PATH = "/hooks/billing"
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
OTHER_SECRET = "whsec_dGhpcyBpcyBhbm90aGVyIHNlY3JldCBlbnRpcmVseQ=="


@dataclass(frozen=True)
class HostDelivery:
    body: bytes
    headers: dict[str, str]
    event: dict[str, Any]
    received_at: float  # monotonic
    status: int = 0

    @property
    def message_id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def type(self) -> str:
        return str(self.event.get("type"))


Answer = int | tuple[int, dict[str, str]]


@dataclass
class HostReceiver:
    secret: str
    url: str = ""
    respond: Answer | Callable[[HostDelivery], Answer] = 200
    deliveries: list[HostDelivery] = field(default_factory=list)  # verified, every answer
    rejected: list[tuple[bytes, dict[str, str], str]] = field(default_factory=list)

    @property
    def delivered(self) -> list[HostDelivery]:
        """Deliveries answered 2xx, once per webhook-id (as a deduplicating receiver keeps them)."""
        seen: set[str] = set()
        kept = []
        for delivery in self.deliveries:
            if 200 <= delivery.status < 300 and delivery.message_id not in seen:
                seen.add(delivery.message_id)
                kept.append(delivery)
        return kept

    def types(self) -> list[str]:
        return [delivery.type for delivery in self.delivered]

    async def wait_for(self, condition: Callable[[HostReceiver], bool], within: float = 20.0) -> None:
        deadline = time.monotonic() + within
        while not condition(self):
            if self.rejected:
                raise AssertionError(f"a delivery failed verification: {self.rejected[-1][2]}")
            if time.monotonic() >= deadline:
                raise AssertionError(f"timed out after {within}s; delivered {self.types()}")
            await asyncio.sleep(0.02)

    async def settle(self, quiet: float = 1.0) -> None:
        """Wait until nothing has arrived for `quiet` seconds."""
        seen = -1
        since = time.monotonic()
        while True:
            if len(self.deliveries) != seen:
                seen, since = len(self.deliveries), time.monotonic()
            elif time.monotonic() - since >= quiet:
                return
            await asyncio.sleep(0.02)

    async def _handle(self, request: Request) -> Response:
        body = await request.body()
        headers = {name.lower(): value for name, value in request.headers.items()}
        try:
            Webhook(self.secret).verify(body, headers)
        except WebhookVerificationError as exc:
            self.rejected.append((body, headers, str(exc)))
            return PlainTextResponse("bad signature", status_code=400)
        delivery = HostDelivery(body, headers, json.loads(body), time.monotonic())
        answer = self.respond(delivery) if callable(self.respond) else self.respond
        status, extra = answer if isinstance(answer, tuple) else (answer, {})
        self.deliveries.append(HostDelivery(body, headers, delivery.event, delivery.received_at, status))
        return PlainTextResponse("ok" if status < 300 else "no", status_code=status, headers=extra)

    def app(self) -> Starlette:
        return Starlette(routes=[Route(PATH, self._handle, methods=["POST"])])


@asynccontextmanager
async def run_host_receiver(secret: str = SECRET, respond: Any = 200) -> AsyncIterator[HostReceiver]:
    port = free_port()
    receiver = HostReceiver(secret=secret, url=f"http://127.0.0.1:{port}{PATH}", respond=respond)
    async with serve(receiver.app(), port):
        yield receiver
