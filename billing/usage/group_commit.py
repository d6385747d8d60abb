"""Group commit: calls that arrive while a group is being written wait, and are written together
as the next group, by one call of `write`; each caller gets its own answer once that call has
returned (for `record_usage`, after the group's transaction committed).

Nothing waits for a group to fill: the first call starts a write as soon as the event loop runs
it, so a lone call is written alone and at once, and under load the group is whatever arrived
during the previous write (at most `max_group`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

Item = TypeVar("Item")
Answer = TypeVar("Answer")


@dataclass(slots=True)
class _Waiting(Generic[Item, Answer]):
    item: Item
    answer: asyncio.Future[Answer]


class GroupCommit(Generic[Item, Answer]):
    """`write(items)` returns one answer per item, in order: a result, or the exception that
    caller gets. An exception raised by `write` itself goes to every caller of the group."""

    def __init__(
        self, write: Callable[[list[Item]], Awaitable[list[Answer | Exception]]], *, max_group: int
    ) -> None:
        self._write = write
        self._max_group = max_group
        self._waiting: list[_Waiting[Item, Answer]] = []
        self._writer: asyncio.Task[None] | None = None
        self.loop = asyncio.get_running_loop()

    async def submit(self, item: Item) -> Answer:
        answer: asyncio.Future[Answer] = self.loop.create_future()
        self._waiting.append(_Waiting(item, answer))
        if self._writer is None:
            self._writer = self.loop.create_task(self._drain())
        return await answer

    async def _drain(self) -> None:
        group: list[_Waiting[Item, Answer]] = []
        try:
            while self._waiting:
                group = self._waiting[: self._max_group]
                del self._waiting[: self._max_group]
                try:
                    answers = await self._write([waiting.item for waiting in group])
                except Exception as exc:
                    answers = [exc] * len(group)
                for waiting, answer in zip(group, answers, strict=True):
                    if waiting.answer.done():  # the caller was cancelled
                        continue
                    if isinstance(answer, Exception):
                        waiting.answer.set_exception(answer)
                    else:
                        waiting.answer.set_result(answer)
        finally:  # cancelled (the loop is closing): nobody is left waiting forever
            for waiting in [*group, *self._waiting]:
                if not waiting.answer.done():
                    waiting.answer.set_exception(RuntimeError("group commit stopped"))
            self._waiting.clear()
            self._writer = None
