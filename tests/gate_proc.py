"""A dependency-gate process for the crash tests (a stand-in for the gates a
``worker`` or ``run`` process hosts).

Usage: python tests/gate_proc.py URL CONFIG_JSON

- CONFIG_JSON: the whole config as JSON (camelCase; it carries the key prefix).
- ``GATE_SLEEP_MS`` (default 0): sleep this long before handling each event,
  so that a test can kill the process in the middle of its work.
- ``GATE_SLEEP_TYPES`` (default: every type): the event types, comma-separated,
  that ``GATE_SLEEP_MS`` slows down.
- ``GATE_CLAIM_IDLE_MS`` (default 300): entries pending this long on another
  consumer of the group are taken over (``logconsumer.CLAIM_IDLE_MS``).
- ``GATE_HEARTBEAT_SECONDS`` (default: the config's ``workers.heartbeatTimeoutSeconds``):
  the process beats in the process registry with this timeout, as a ``worker``
  or ``run`` process does; ``0`` runs without a presence (the gates then take
  over only entries idle for ``GATE_CLAIM_IDLE_MS``).

Runs ``Gates.run`` (consumer group ``gates``) under this process's own
consumer name. Prints ``READY <consumer name>`` once it has started, then
``HANDLED <n> <event type> <job id> <agent>/<event id>`` after each event it
has handled (before the batch is acknowledged), and ``STOPPED`` when SIGTERM made it stop.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

# Run as a script, the project root is not on the path (only tests/ is).
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def main(argv: list[str]) -> int:
    import agentq
    from agentq.consumers import logconsumer
    from agentq.consumers.gates import Gates
    from agentq.consumers.presence import Presence
    from agentq.eventlog.reader import RawEvent
    from agentq.schemas.config import Config

    url, config_json = argv[:2]
    config = Config.model_validate_json(config_json)
    sleep = int(os.environ.get("GATE_SLEEP_MS", "0")) / 1000
    slow_types = set(filter(None, os.environ.get("GATE_SLEEP_TYPES", "").split(",")))
    logconsumer.CLAIM_IDLE_MS = int(os.environ.get("GATE_CLAIM_IDLE_MS", "300"))

    class SlowGates(Gates):
        handled = 0

        async def handle(self, events: list[RawEvent]) -> None:
            for event in events:
                if sleep and (not slow_types or event.type in slow_types):
                    await asyncio.sleep(sleep)
                await super().handle([event])
                self.handled += 1
                _say(f"HANDLED {self.handled} {event.type} {event.job_id} "
                     f"{event.agent}/{event.event_id}")

    async with agentq.connect(url, config) as q:
        gates = SlowGates(q.redis, q.open_blocking(), q.keys,
                          max_attempts=config.jobs.max_attempts,
                          idempotency_ttl=config.jobs.idempotency_ttl_seconds)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        heartbeat = float(os.environ.get("GATE_HEARTBEAT_SECONDS",
                                         config.workers.heartbeat_timeout_seconds))
        loops = [gates.run(stop)]
        if heartbeat:
            presence = Presence(q.redis, q.keys, gates.consumer, heartbeat)
            gates.follow(presence)
            await presence.beat()
            loops.append(presence.run(stop))
        _say(f"READY {gates.consumer}")
        await asyncio.gather(*loops)
    _say("STOPPED")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
