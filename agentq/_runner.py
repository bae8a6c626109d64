"""Running workers: one or several agents' workers and the background
consumers in this process."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from agentq._deployment import Deployment
from agentq.consumers.background import Background
from agentq.consumers.handlers import Job, wrap
from agentq.consumers.worker import Ended, Worker, WorkerSettings
from agentq.eventlog.scripts import Backoff, Confirm


@dataclass(frozen=True)
class WorkerSpec:
    """One worker a :class:`Runner` runs: an agent, its handler, how many jobs at once."""

    agent: str
    handler: Callable[[Job], Any]
    concurrency: int | None = None


class Runner:
    """Workers plus (optionally) the process's background consumers; ``await
    run()`` runs them until ``stop()``, then lets running jobs finish. It runs them
    on ``deployment``, which must be open."""

    def __init__(
        self, deployment: Deployment, workers: Sequence[WorkerSpec], background: bool
    ) -> None:
        self.deployment = deployment
        self.specs = list(workers)
        self.background = background
        self._stop = asyncio.Event()
        self.workers: list[Worker] = []
        # Told of every attempt a worker of this runner ran, as it ends.
        self.on_ended: Callable[[Ended], None] | None = None

    def stop(self, *, now: bool = False) -> None:
        """Stop taking jobs and let running ones finish within the grace period;
        with ``now``, stop their handlers at once and hand their jobs back."""
        self._stop.set()
        if now:
            for worker in self.workers:
                worker.stop(now=True)

    @property
    def ended(self) -> dict[str, int]:
        """Attempts ended so far, by outcome, over every worker."""
        totals: dict[str, int] = {}
        for worker in self.workers:
            for outcome, n in worker.ended.items():
                totals[outcome] = totals.get(outcome, 0) + n
        return totals

    @property
    def worker(self) -> Worker | None:
        """The first worker, once running (the only one for ``Client.worker``)."""
        return self.workers[0] if self.workers else None

    def _settings(self, spec: WorkerSpec) -> WorkerSettings:
        config = self.deployment.config
        agent_config = config.agents.get(spec.agent)
        return WorkerSettings(
            agent=spec.agent,
            concurrency=spec.concurrency or (agent_config.concurrency if agent_config else 1),
            lease_ms=int(config.jobs.lease_seconds * 1000),
            backoff=Backoff.of(config.jobs),
            heartbeat_timeout=config.workers.heartbeat_timeout_seconds,
            shutdown_grace=config.workers.shutdown_grace_seconds,
            confirm=Confirm.of(config.redis),
        )

    async def run(self) -> None:
        deployment = self.deployment
        for spec in self.specs:
            # SPEC: an agent for which a worker has started is known.
            if not await deployment.redis.exists(deployment.partition(spec.agent).meta):
                await deployment.add_agent(spec.agent)
            worker = Worker(deployment.redis, deployment.open_blocking(), deployment.keys,
                            self._settings(spec), wrap(spec.handler), on_ended=self.on_ended)
            self.workers.append(worker)
        tasks = [asyncio.create_task(w.run(self._stop)) for w in self.workers]
        if self.background:
            background = Background(deployment.redis, deployment.open_blocking,
                                    deployment.keys, deployment.config)
            tasks.append(asyncio.create_task(background.run(self._stop)))
        try:
            await asyncio.gather(*tasks)
        finally:
            self._stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
