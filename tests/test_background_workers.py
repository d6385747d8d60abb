"""The drainers' loop stops when the app cancels it, however the cancellation arrives."""

from __future__ import annotations

import asyncio
import contextlib

from billing.background import poll_until_cancelled


async def stopped(task: asyncio.Task[None]) -> bool:
    """True when `task` ended by cancellation within a few seconds (a guard against hanging the
    suite, not a speed check). `asyncio.wait` does not cancel the task when it gives up."""
    await asyncio.wait({task}, timeout=5)
    return task.cancelled()


async def test_a_kick_arriving_with_the_cancellation_does_not_keep_the_loop_running() -> None:
    wake = asyncio.Event()
    passes = 0

    async def run_pass() -> None:
        nonlocal passes
        passes += 1

    task = asyncio.create_task(poll_until_cancelled(run_pass, wake=wake, poll_seconds=0.05, name="test"))
    await asyncio.sleep(0)  # the first pass ran; the loop waits for a kick
    for _ in range(20):  # kick and cancel in the same turn of the event loop, many times
        wake.set()
        task.cancel()
        await asyncio.sleep(0)
        if task.done():
            break
    assert await stopped(task)
    assert passes >= 1


async def test_a_cancellation_swallowed_inside_a_pass_still_ends_the_loop() -> None:
    started = asyncio.Event()

    async def swallowing_pass() -> None:
        started.set()
        # What a driver that turns a cancellation into a failed connection amounts to:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(10)

    task = asyncio.create_task(
        poll_until_cancelled(swallowing_pass, wake=asyncio.Event(), poll_seconds=60, name="test")
    )
    await started.wait()
    task.cancel()
    assert await stopped(task)


async def test_a_failing_pass_is_retried_on_the_next_kick() -> None:
    wake = asyncio.Event()
    calls: list[int] = []
    second = asyncio.Event()

    async def failing_then_working() -> None:
        calls.append(len(calls))
        if len(calls) == 1:
            raise RuntimeError("database gone")
        second.set()

    task = asyncio.create_task(
        poll_until_cancelled(failing_then_working, wake=wake, poll_seconds=60, name="test")
    )
    await asyncio.sleep(0)
    wake.set()
    async with asyncio.timeout(5):
        await second.wait()
    task.cancel()
    assert await stopped(task)
    assert calls == [0, 1]
