"""asyncio helpers every long-running loop in edgetwin uses, so that stopping always ends.

Python 3.11's ``asyncio.wait_for`` loses a cancellation that arrives while the awaited
thing is completing (CPython gh-86296, fixed in 3.12): it returns the result instead of
raising ``CancelledError``. A ``while True`` loop around it then never ends, and whoever
waits for it (a shutdown, a mapper's stop) hangs for good. :func:`wait_within` is the
replacement built on ``asyncio.timeout``, which counts cancellations correctly.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

__all__ = ["cancel_tasks", "wait_within"]

T = TypeVar("T")


async def wait_within(aw: Awaitable[T], seconds: float | None) -> T:
    """Await ``aw`` for at most ``seconds`` (``None``: no limit).

    Raises :class:`TimeoutError` when the time is up (``aw`` is cancelled then), like
    ``asyncio.wait_for``, but never swallows a cancellation of the caller."""
    async with asyncio.timeout(seconds):
        return await aw


async def cancel_tasks(tasks: Iterable[asyncio.Task[Any]], limit_s: float | None = None) -> list[str]:
    """Cancel ``tasks`` and wait until they have ended; returns the names of those still
    running after ``limit_s`` seconds (``None``: wait as long as it takes).

    A task that swallows its cancellation (a third-party library's own ``wait_for``) is
    cancelled again each second, so this ends whenever the task lets it."""
    pending = [t for t in tasks if not t.done()]
    for task in pending:
        task.cancel()
    loop = asyncio.get_running_loop()
    deadline = None if limit_s is None else loop.time() + limit_s
    while pending:
        wait = 1.0 if deadline is None else min(1.0, deadline - loop.time())
        if wait <= 0:
            break
        _, still = await asyncio.wait(pending, timeout=wait)
        for task in still:
            task.cancel()
        pending = list(still)
    for task in tasks:
        if task.done():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                task.result()  # retrieved, so asyncio does not log "never retrieved"
    return [t.get_name() for t in pending]


class Abandoned:
    """Futures nobody awaits any more (their callers were cancelled, or gave up) that
    must still run to their end: kept referenced until they end, their outcome taken so
    no "exception was never retrieved" is logged, ``then`` called with each when it ends.
    :meth:`cancel_all` ends those left when what they ran on is gone."""

    def __init__(self) -> None:
        self._held: set[asyncio.Future[Any]] = set()

    def __len__(self) -> int:
        return len(self._held)

    def add(
        self, future: asyncio.Future[Any], then: Callable[[asyncio.Future[Any]], None] | None = None
    ) -> None:
        self._held.add(future)

        def ended(done: asyncio.Future[Any]) -> None:
            self._held.discard(done)
            if not done.cancelled():
                done.exception()
            if then is not None:
                then(done)

        future.add_done_callback(ended)

    def cancel_all(self) -> None:
        for future in list(self._held):
            future.cancel()
