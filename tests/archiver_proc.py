"""An archiving process for the crash tests: archiving passes, over and over.

Usage: python tests/archiver_proc.py URL CONFIG_JSON AGENT...

- CONFIG_JSON: the whole config as JSON (camelCase; it carries the key prefix
  and ``retention``, whose ``archive`` must be set).
- ``ARCH_SEGMENT_EVENTS`` (default 5): events per segment, so that a pass
  writes many segments.
- ``ARCH_SLEEP_MS`` (default 0): after each segment is in the archive, sleep up
  to this long (a random time) before Redis records it, and likewise after
  jobs are removed from the partition before they leave the global indexes,
  so that a kill lands between the two writes too.
- ``ARCH_LOCK_SECONDS`` (default 0.5): the archive lock's lapse, so that a
  process started after a killed one does not wait long.

Prints ``READY <pid>``, then ``SEGMENT <agent> <last event id>`` after each segment
the archive holds (before Redis records it), ``EXPIRED <agent> <n>`` after
jobs were removed from the partition (before the global indexes) and ``PASS
<agent> <events> <removed> <trimmed>`` after each pass; ``STOPPED`` on SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

# Run as a script, the project root is not on the path (only tests/ is).
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def main(argv: list[str]) -> int:
    from redis.exceptions import LockError

    import agentq
    from agentq.consumers.archiver import Archiver
    from agentq.eventlog.archive import Archive, ArchivedLine, Segment, open_archive
    from agentq.eventlog.keys import Partition
    from agentq.schemas.config import Config

    url, config_json, *agents = argv
    config = Config.model_validate_json(config_json)
    assert config.retention.archive is not None
    sleep_ms = int(os.environ.get("ARCH_SLEEP_MS", "0"))

    class Slowed:
        """The archive, with a pause after each append (before Redis records it)."""

        def __init__(self, archive: Archive) -> None:
            self.archive = archive

        def __getattr__(self, name: str) -> object:
            return getattr(self.archive, name)

        async def append(self, agent: str, lines: Sequence[ArchivedLine]) -> Segment:
            segment = await self.archive.append(agent, lines)
            _say(f"SEGMENT {agent} {segment.last}")
            if sleep_ms:
                await asyncio.sleep(random.random() * sleep_ms / 1000)
            return segment

    class SlowArchiver(Archiver):
        async def _unindex(self, part: Partition, jobs: Sequence[tuple[str, str]],
                           fields: Sequence[str]) -> None:
            _say(f"EXPIRED {part.agent} {len(jobs)}")
            if sleep_ms:
                await asyncio.sleep(random.random() * sleep_ms / 1000)
            await super()._unindex(part, jobs, fields)

    async with agentq.connect(url, config) as q:
        archive = Slowed(open_archive(config.retention.archive, q.keys.prefix))
        archiver = SlowArchiver(
            q.redis, q.redis, q.keys, archive, config.retention,  # type: ignore[arg-type]
            segment_events=int(os.environ.get("ARCH_SEGMENT_EVENTS", "5")),
            lock_seconds=float(os.environ.get("ARCH_LOCK_SECONDS", "0.5")))
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        _say(f"READY {os.getpid()}")
        while not stop.is_set():
            for agent in agents:
                try:
                    outcome = await archiver.archive_partition(q.partition(agent), wait=True)
                except LockError:  # slow storage outlived the lock: as the background does
                    _say(f"LAPSED {agent}")
                    continue
                _say(f"PASS {agent} {outcome.events} {outcome.removed} {outcome.trimmed}")
    _say("STOPPED")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
