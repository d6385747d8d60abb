"""Helpers for the real-time tests: a graphql-transport-ws client and timings.

The client is httpx-ws against the service's real port, speaking `graphql-transport-ws` as the
`graphql-ws` npm client does. A background task receives every message as it arrives and stamps
it, so a test can say when a state arrived and that nothing else did.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
from httpx_ws import AsyncWebSocketSession, WebSocketDisconnect, aconnect_ws

from db.engine import Database
from tests.billing_flows import account
from tests.conftest import PG_HOST, PG_PORT, PG_USER

PROTOCOL = "graphql-transport-ws"
STATE_FIELDS = "status tier interval currentPeriodEnd cancelAtPeriodEnd hasAccess"
SUBSCRIPTION = f"subscription {{ billingStateChanged {{ {STATE_FIELDS} }} }}"
# Each wait is bounded; only the "within one second" checks are about speed.
WAIT = 15.0
DELIVERY = 1.0


@dataclass
class Received:
    at: float  # time.monotonic() when the message arrived
    message: dict[str, Any]


@dataclass
class LiveSocket:
    """One graphql-transport-ws connection: every message received, in order, with its time."""

    ws: AsyncWebSocketSession
    received: list[Received] = field(default_factory=list)
    closed: WebSocketDisconnect | None = None
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)
    _taken: set[int] = field(default_factory=set)  # indexes already handed out by `next_message`

    async def pump(self) -> None:
        try:
            while True:
                message = await self.ws.receive_json()
                self.received.append(Received(time.monotonic(), message))
                self._arrived.set()
        except WebSocketDisconnect as exc:
            self.closed = exc
            self._arrived.set()

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send_json(message)

    async def subscribe(self, operation_id: str = "1", query: str = SUBSCRIPTION) -> None:
        await self.send({"id": operation_id, "type": "subscribe", "payload": {"query": query}})

    async def next_message(self, operation_id: str | None = None, within: float = WAIT) -> Received:
        """The oldest message not yet handed out (of the operation, when given one)."""
        deadline = time.monotonic() + within
        while True:
            for index, item in enumerate(self.received):
                if index not in self._taken and operation_id in (None, item.message.get("id")):
                    self._taken.add(index)
                    return item
            if self.closed is not None:
                raise AssertionError(f"socket closed ({self.closed.code}) while waiting for a message")
            self._arrived.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no message within {within} s; unread: {self.unread()}")
            with suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)

    async def next_state(self, operation_id: str = "1", within: float = WAIT) -> tuple[float, dict[str, Any]]:
        """The next `billingStateChanged` value sent on the operation, and when it arrived."""
        item = await self.next_message(operation_id, within)
        message = item.message
        assert message.get("id") == operation_id and message.get("type") == "next", message
        assert "errors" not in message["payload"], message
        state: dict[str, Any] = message["payload"]["data"]["billingStateChanged"]
        return item.at, state

    async def state_where(
        self, check: Callable[[dict[str, Any]], bool], operation_id: str = "1", within: float = WAIT
    ) -> tuple[float, dict[str, Any]]:
        """Skip states until one passes `check` (a flow may pass through states on its way)."""
        deadline = time.monotonic() + within
        while True:
            at, state = await self.next_state(operation_id, max(deadline - time.monotonic(), 0.01))
            if check(state):
                return at, state

    def unread(self) -> list[dict[str, Any]]:
        return [item.message for index, item in enumerate(self.received) if index not in self._taken]

    async def closed_with(self, within: float = WAIT) -> int:
        """The close code, once the server closes the socket."""
        deadline = time.monotonic() + within
        while self.closed is None:
            self._arrived.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"socket not closed within {within} s; received {self.unread()}")
            with suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)
        return self.closed.code


@asynccontextmanager
async def live_socket(
    base_url: str, token: str | None = None, *, init: bool = True, payload: dict[str, Any] | None = None
) -> AsyncIterator[LiveSocket]:
    """A connected socket; with `init`, `connection_init` (with the token) was sent and acknowledged."""
    async with (
        httpx.AsyncClient(timeout=10) as client,
        aconnect_ws(f"{base_url}/graphql", client, subprotocols=[PROTOCOL]) as ws,
    ):
        assert ws.subprotocol == PROTOCOL
        socket = LiveSocket(ws)
        pump = asyncio.create_task(socket.pump())
        try:
            if init:
                sent = dict(payload or {})
                if token is not None:
                    sent["authorization"] = f"Bearer {token}"
                await socket.send({"type": "connection_init", "payload": sent})
                ack = await socket.next_message()
                assert ack.message["type"] == "connection_ack", ack.message
            yield socket
        finally:
            pump.cancel()
            with suppress(asyncio.CancelledError):
                await pump


async def first_seen(database: Database, user_id: str, within: float = 60.0, **expected: Any) -> float:
    """When (time.monotonic()) the account row first showed `expected` to a poller (every 10 ms).

    The moment a change is committed is at or before this; a state received at `t` was
    therefore delivered within `t - first_seen(...)` of the commit, or faster.
    """
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        row = await account(database, user_id)
        if row is not None and all(getattr(row, key) == value for key, value in expected.items()):
            return time.monotonic()
        await asyncio.sleep(0.01)
    raise AssertionError(f"account {user_id} never showed {expected}")


def watch_commit(database: Database, user_id: str, **expected: Any) -> asyncio.Task[float]:
    """Start polling for the change before making it."""
    return asyncio.create_task(first_seen(database, user_id, **expected))


async def terminate_backend(pid: int) -> None:
    """Kill a PostgreSQL backend (a LISTEN connection, say), as a network failure would."""
    conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database="postgres")
    try:
        assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid) is True
    finally:
        await conn.close()
