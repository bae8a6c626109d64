"""The background consumers every ``worker`` and ``run`` process hosts: the
process's presence (its heartbeat in the process registry), the scheduler,
stall recovery, and the log consumers. Any one live process keeps the whole
system moving; more processes share the work, and when one dies the others
take over what it held as soon as its heartbeat deadline passes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog
from redis.asyncio import Redis

from agentq.consumers.alerts import Alerter
from agentq.consumers.gates import Gates
from agentq.consumers.logconsumer import consumer_name
from agentq.consumers.presence import Presence
from agentq.consumers.projector import Projector
from agentq.consumers.reclaim import Reclaimer
from agentq.consumers.scheduler import Scheduler
from agentq.consumers.waiting import sleep_unless_stopped
from agentq.eventlog.keys import Keys
from agentq.eventlog.scripts import Backoff
from agentq.schemas.config import Config

log = structlog.get_logger("agentq.background")

Loop = Callable[[asyncio.Event], Awaitable[None]]

_RESTART_DELAY = 1.0


async def _supervised(name: str, loop: Loop, stop: asyncio.Event) -> None:
    """Run ``loop`` until ``stop``; when it fails (Redis went away, say), log
    and start it again after a short pause instead of taking the process down."""
    while not stop.is_set():
        try:
            await loop(stop)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("background consumer failed; restarting", consumer=name, error=str(exc))
            await sleep_unless_stopped(_RESTART_DELAY, stop)


class Background:
    """The process's background consumers; ``extra`` adds more (alerts, gates…)."""

    def __init__(
        self, redis: Redis, blocking: Callable[[], Redis], keys: Keys, config: Config,
        *, extra: dict[str, Loop] | None = None,
    ) -> None:
        """``blocking`` makes a connection for blocking reads (one per consumer)."""
        jobs = config.jobs
        backoff = Backoff.of(jobs)
        name = consumer_name()
        presence = Presence(redis, keys, name, config.workers.heartbeat_timeout_seconds)
        gates = Gates(redis, blocking(), keys, name, max_attempts=jobs.max_attempts,
                      idempotency_ttl=jobs.idempotency_ttl_seconds)
        projector = Projector(redis, blocking(), keys, name)
        alerter = Alerter(redis, blocking(), keys, config, name)
        for consumer in (gates, projector, alerter):
            consumer.follow(presence)
        self.loops: dict[str, Loop] = {
            "presence": presence.run,
            "scheduler": Scheduler(redis, blocking(), keys).run,
            "reclaimer": Reclaimer(redis, keys, backoff).run,
            "gates": gates.run,
            "projector": projector.run,
            "alerts": alerter.run,
            **(extra or {}),
        }

    async def run(self, stop: asyncio.Event) -> None:
        await asyncio.gather(*(_supervised(n, loop, stop) for n, loop in self.loops.items()))
