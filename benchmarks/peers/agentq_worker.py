"""agentq's benchmark worker: ``python -m benchmarks.peers.agentq_worker URL [N]``
(run from the repository root). One process: ``q.worker("bench", noop)`` with its
background consumers (scheduler, stall recovery, gates, projector, alerts), as a
real ``agentq worker`` runs. With ``--release`` the handler is the release
measurement's (tasks ``A <pair>`` and ``B <pair>``). Stops on SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import time
from collections.abc import Callable
from typing import Any

import agentq
from agentq.schemas.config import Config
from benchmarks.peers._common import ReleaseClock

AGENT = "bench"


def bench_config() -> Config:
    return Config.model_validate(
        {"keyPrefix": "bench", "rateLimit": {"dispatchesPerMinute": 0, "maxQueueDepth": 0}}
    )


async def noop(job: Any) -> None:
    return None


def release_handler(url: str) -> Callable[[Any], Any]:
    clock = ReleaseClock(url)

    async def step(job: Any) -> None:
        started = time.time()
        role, pair = job.task.split()
        if role == "A":
            await clock.prerequisite_async(pair)
        else:
            clock.dependent(pair, started)

    return step


async def main(url: str, concurrency: int, release: bool) -> None:
    handler = release_handler(url) if release else noop
    async with agentq.connect(url, bench_config()) as q:
        await q.add_agent(AGENT)
        run = q.worker(AGENT, handler, concurrency=concurrency)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, run.stop)
        await run.run()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("n", type=int, nargs="?", default=0)  # unused: agentq keeps its own times
    p.add_argument("--concurrency", type=int, default=10)
    p.add_argument("--poll-ms", type=float, default=5.0)  # unused: agentq does not poll
    p.add_argument("--release", action="store_true")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main(a.url, a.concurrency, a.release))
