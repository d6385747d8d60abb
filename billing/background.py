"""The loop that runs a background worker (webhook inbox, usage reporting) until cancelled."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("billing")


async def poll_until_cancelled(
    run_pass: Callable[[], Awaitable[object]], *, wake: asyncio.Event, poll_seconds: float, name: str
) -> None:
    """Run `run_pass` promptly after `wake` is set, else every `poll_seconds`, until cancelled.

    The wait uses `asyncio.timeout`, not `asyncio.wait_for`: on Python 3.11 `wait_for` loses a
    cancellation that arrives as the awaited event fires (a kick during shutdown), and the loop
    would run on while the app waits for it to stop. A failed pass is logged and retried; a
    cancellation a driver swallowed inside a pass still ends the loop.
    """
    task = asyncio.current_task()
    while True:
        try:
            await run_pass()
        except Exception:
            log.exception("%s pass failed; retrying", name)
        if task is not None and task.cancelling():
            raise asyncio.CancelledError
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(poll_seconds):
                await wake.wait()
        wake.clear()


class BackgroundWorker:
    """A drainer of one `LeasedQueue`, run by the app as a task: `kick` to drain promptly."""

    name = "worker"

    def __init__(self, *, poll_seconds: float) -> None:
        self.poll_seconds = poll_seconds
        self._wake = asyncio.Event()

    def kick(self) -> None:
        self._wake.set()

    async def drain(self) -> object:
        raise NotImplementedError

    async def run(self) -> None:
        """Drain until cancelled: promptly after a kick, else every `poll_seconds`."""
        await poll_until_cancelled(
            self.drain, wake=self._wake, poll_seconds=self.poll_seconds, name=self.name
        )
