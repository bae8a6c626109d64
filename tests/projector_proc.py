"""A projector process for the crash tests (a stand-in for the projector every
``worker`` or ``run`` process hosts).

Usage: python tests/projector_proc.py URL CONFIG_JSON

- CONFIG_JSON: the whole config as JSON (camelCase; it carries the key prefix).
- ``PROJ_SLEEP_MS`` (default 0): sleep this long before applying each event,
  so that a test can kill the process in the middle of a batch.
- ``PROJ_CLAIM_IDLE_MS`` (default 300): entries pending this long on another
  consumer of the group are taken over (``logconsumer.CLAIM_IDLE_MS``).

Runs ``Projector.run`` (consumer group ``projector``) under this process's own
consumer name, applying the events of a batch one at a time (each in its own
script call, as a batch of one). Prints ``READY <consumer name>`` once it has
started, ``APPLIED <n> 1 <agent>/<event id>`` after each event it has
handled (before the batch is acknowledged), and ``STOPPED`` when SIGTERM made
it stop.
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
    from agentq.consumers.projector import Projector
    from agentq.eventlog.reader import RawEvent
    from agentq.schemas.config import Config

    url, config_json = argv[:2]
    config = Config.model_validate_json(config_json)
    sleep = int(os.environ.get("PROJ_SLEEP_MS", "0")) / 1000
    logconsumer.CLAIM_IDLE_MS = int(os.environ.get("PROJ_CLAIM_IDLE_MS", "300"))

    class SlowProjector(Projector):
        handled = 0

        async def handle(self, events: list[RawEvent]) -> None:
            # Each event through the real handler, as a batch of one, so that
            # its ordering rules (never apply past a gap) are what is tested.
            for event in events:
                if sleep:
                    await asyncio.sleep(sleep)
                await super().handle([event])
                self.handled += 1
                _say(f"APPLIED {self.handled} 1 {event.agent}/{event.event_id}")

    async with agentq.connect(url, config) as q:
        projector = SlowProjector(q.redis, q.open_blocking(), q.keys)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        _say(f"READY {projector.consumer}")
        await projector.run(stop)
    _say("STOPPED")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
