"""Waiting for something or for a stop signal, whichever comes first."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any


async def until_stopped(
    awaitable: Awaitable[Any], stop: asyncio.Event, timeout: float | None = None
) -> bool:
    """Wait for ``awaitable`` unless ``stop`` is set first or ``timeout`` seconds
    pass (then it is cancelled).

    Returns True when ``awaitable`` finished; its exception, if any, is raised.
    """
    waiter = asyncio.ensure_future(awaitable)
    stopper = asyncio.ensure_future(stop.wait())
    done, pending = await asyncio.wait(
        {waiter, stopper}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
    )
    pending = {waiter, stopper} - done
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    if waiter in done:
        waiter.result()
        return True
    return False


async def sleep_unless_stopped(seconds: float, stop: asyncio.Event) -> None:
    """Sleep ``seconds``, returning early when ``stop`` is set."""
    await until_stopped(asyncio.sleep(seconds), stop)
