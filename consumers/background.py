"""The background consumers every ``worker`` and ``run`` process hosts: the
process's presence (its heartbeat in the process registry, which also renews
its leases on shards), its ownership (which partitions it serves, the doorbell
and the sweep), the scheduler, stall recovery, the log consumers, and, when
``retention.archive`` is set, the archiving pass. Each
partition's background work is served by one live process at a time; more
processes share the partitions, and when one dies the others claim its shards
as soon as its heartbeat deadline passes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog
from redis.asyncio import Redis

from agentq.consumers.alerts import Alerter
from agentq.consumers.approvals import ApprovalNotices
from agentq.consumers.archiver import Archiver
from agentq.consumers.gates import Gates
from agentq.consumers.logconsumer import consumer_name
from agentq.consumers.ownership import Ownership
from agentq.consumers.presence import Presence
from agentq.consumers.projector import Projector
from agentq.consumers.reclaim import Reclaimer
from agentq.consumers.scheduler import Scheduler
from agentq.consumers.schedules import Ticks
from agentq.consumers.waiting import sleep_unless_stopped
from agentq.eventlog.archive import open_archive
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
        """``blocking`` makes a connection without a socket timeout: the doorbell's
        subscription is carried on one."""
        jobs = config.jobs
        backoff = Backoff.of(jobs)
        name = consumer_name()
        timeout = config.workers.heartbeat_timeout_seconds
        self.ownership = ownership = Ownership(redis, blocking(), keys, name,
                                               timeout_seconds=timeout)
        self.presence = presence = Presence(redis, keys, name, timeout, ownership=ownership)
        # With an archive, events go there and ended jobs leave Redis; without
        # one, nothing leaves Redis.
        archive = None if config.retention.archive is None \
            else open_archive(config.retention.archive, keys.prefix)
        gates = Gates(redis, redis, keys, name, max_attempts=jobs.max_attempts,
                      idempotency_ttl=config.retention.idempotency_seconds,
                      ownership=ownership, archive=archive)
        projector = Projector(redis, redis, keys, name, ownership=ownership)
        alerter = Alerter(redis, redis, keys, config, name, ownership=ownership,
                          notices=[ApprovalNotices(redis, config)])
        for consumer in (gates, projector, alerter):
            consumer.follow(presence)
        ticks = Ticks(redis, keys, max_queue_depth=config.rate_limit.max_queue_depth,
                      idempotency_ttl=config.retention.idempotency_seconds)
        self.scheduler = Scheduler(redis, redis, keys, ownership=ownership, ticks=ticks)
        self.reclaimer = Reclaimer(redis, keys, backoff, ownership=ownership)
        for component in (gates, projector, alerter, self.scheduler, self.reclaimer):
            ownership.serve(component)
        self.loops: dict[str, Loop] = {
            "ownership": ownership.run,
            "scheduler": self.scheduler.run,
            "reclaimer": self.reclaimer.run,
            "gates": gates.run,
            "projector": projector.run,
            "alerts": alerter.run,
        }
        self.archiver: Archiver | None = None
        if archive is not None:
            self.archiver = Archiver(redis, redis, keys, archive, config.retention,
                                     ownership=ownership)
            ownership.serve(self.archiver)
            self.loops["archiver"] = self.archiver.run
        self.loops.update(extra or {})

    async def run(self, stop: asyncio.Event) -> None:
        # The presence stops last: a clean stop releases the process's leases
        # once its consumers have stopped and acknowledged what they handled.
        leave = asyncio.Event()
        presence = asyncio.create_task(_supervised("presence", self.presence.run, leave))
        try:
            await asyncio.gather(*(_supervised(n, loop, stop) for n, loop in self.loops.items()))
        finally:
            leave.set()
            await presence
