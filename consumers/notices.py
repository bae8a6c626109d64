"""Cancel notices: the cancel script publishes the id of each active job it
cancels on the partition's channel; a worker listens and checks those it runs
at once. Pub/sub can drop a message (a reconnect, a slow reader), so the
worker's lease renewal, every lease/3, stays the sweep behind it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

log = structlog.get_logger("agentq.worker")

_RETRY_FIRST, _RETRY_MAX = 0.1, 2.0


class CancelNotices:
    """Listens on ``channel`` and calls ``on_notice(job_id)`` for each message,
    subscribing again (after a pause) whenever the connection drops, and then
    ``on_resubscribed()``: what was published meanwhile never arrives."""

    def __init__(self, redis: Redis, channel: str, on_notice: Callable[[str], Awaitable[None]],
                 on_resubscribed: Callable[[], Awaitable[None]]) -> None:
        self.redis = redis
        self.channel = channel
        self.on_notice = on_notice
        self.on_resubscribed = on_resubscribed
        self.subscribed = asyncio.Event()
        self.subscribed_once = False
        self.pubsub: PubSub | None = None  # the current subscription

    async def run(self) -> None:
        pause = _RETRY_FIRST
        while True:
            self.pubsub = pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                if self.subscribed_once:
                    # Notices sent while no one listened are lost: check everything.
                    await self.on_resubscribed()
                self.subscribed_once = True
                self.subscribed.set()
                pause = _RETRY_FIRST
                while True:
                    message = await pubsub.get_message(timeout=None)
                    if message is not None and message.get("type") == "message":
                        await self.on_notice(str(message["data"]))
            except Exception as exc:
                log.warning("cancel notices: listening again shortly", error=str(exc),
                            retry_in=pause)
            finally:
                self.subscribed.clear()
                await pubsub.aclose()
            await asyncio.sleep(pause)
            pause = min(pause * 2, _RETRY_MAX)
