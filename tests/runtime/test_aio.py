"""runtime.aio.Abandoned: futures nobody awaits, kept until they end."""

from __future__ import annotations

import asyncio
import gc

from edgetwin.runtime.aio import Abandoned


async def test_abandoned_futures_run_to_their_end_and_their_failures_are_taken() -> None:
    held = Abandoned()
    ended: list[str] = []

    async def fails() -> None:
        await asyncio.sleep(0.01)
        raise RuntimeError("nobody is listening")

    held.add(asyncio.ensure_future(fails()), then=lambda f: ended.append("fails"))
    gc.collect()  # held: not collected while it runs
    assert len(held) == 1
    await asyncio.sleep(0.05)
    assert ended == ["fails"] and len(held) == 0


async def test_cancel_all_ends_what_is_left() -> None:
    held = Abandoned()
    slow = asyncio.ensure_future(asyncio.sleep(30))
    held.add(slow)
    held.cancel_all()
    await asyncio.wait({slow})
    await asyncio.sleep(0)  # its done callbacks run on the next turn of the loop
    assert slow.cancelled() and len(held) == 0
