"""Owned background tasks: no bare ``create_task`` anywhere else in mcproxy.

A ``TaskSet`` keeps a strong reference to every task it starts (asyncio only keeps weak ones),
logs a task that fails instead of letting the error vanish, hands that failure to its owner
(``on_error``: an upstream whose reader died declares itself lost, so the session re-routes
instead of waiting on a child nobody reads), and cancels what is left when its owner closes.
The daemon owns the long-lived tasks; each connection and upstream owns its own through the
TaskSet it was given.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

log = structlog.get_logger("mcproxy")


OnError = Callable[["asyncio.Task[Any]", BaseException], None]
"""``on_error(task, exc)``: called on the loop when one of the set's tasks raised."""


class TaskSet:
    def __init__(self, name: str, on_error: OnError | None = None) -> None:
        self.name = name
        self.on_error = on_error
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error(
                "task.failed", owner=self.name, task=task.get_name(), error=repr(exc), exc_info=exc
            )
            if self.on_error is not None:
                try:
                    self.on_error(task, exc)
                except Exception as again:  # a done callback must not raise into the loop
                    log.error(
                        "task.on_error_failed", owner=self.name, error=repr(again), exc_info=again
                    )

    def __len__(self) -> int:
        return len(self._tasks)

    async def cancel_all(self) -> None:
        """Cancel every task and wait for them; never raises their errors."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
