"""A process hosting the background work as every ``worker`` and ``run``
process does (:class:`agentq.consumers.Background`), for the ownership tests.

Usage: python tests/background_proc.py URL CONFIG_JSON

- CONFIG_JSON: the whole config as JSON (camelCase; it carries the key prefix
  and ``workers.heartbeatTimeoutSeconds``).
- ``BG_SWEEP_PER_SECOND`` (default: the ownership's): this process's sweep rate.
- ``BG_QUIET`` (default unset): print no CALL lines.

Prints ``READY <process name>`` once it has started, ``SHARDS <n> <shards,
comma-separated>`` whenever the shards it serves change, ``CALL <script>
<agent> <server ms>`` after each scheduler (``promote``) or stall recovery
(``stall``) script call on a partition, and ``STOPPED`` when SIGTERM made it stop.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

# Run as a script, the project root is not on the path (only tests/ is).
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def main(argv: list[str]) -> int:
    import agentq
    from agentq.consumers.background import Background
    from agentq.eventlog.keys import Partition
    from agentq.eventlog.scripts import Scripts, Timed
    from agentq.schemas.config import Config

    url, config_json = argv[:2]
    config = Config.model_validate_json(config_json)

    if not os.environ.get("BG_QUIET"):
        promote_due, stall_due = Scripts.promote_due, Scripts.stall_due

        async def promoting(self: Scripts, part: Partition, *args: Any) -> Timed:
            timed = await promote_due(self, part, *args)
            _say(f"CALL promote {part.agent} {timed.now_ms}")
            return timed

        async def stalling(self: Scripts, part: Partition, *args: Any) -> Timed:
            timed = await stall_due(self, part, *args)
            _say(f"CALL stall {part.agent} {timed.now_ms}")
            return timed

        Scripts.promote_due = promoting  # type: ignore[method-assign]
        Scripts.stall_due = stalling  # type: ignore[method-assign]

    async with agentq.connect(url, config) as q:
        background = Background(q.redis, q.open_blocking, q.keys, config)
        ownership = background.ownership
        if "BG_SWEEP_PER_SECOND" in os.environ:
            ownership.sweep_per_second = float(os.environ["BG_SWEEP_PER_SECOND"])
        ownership.on_change.append(
            lambda shards: _say(f"SHARDS {len(shards)} {','.join(map(str, sorted(shards)))}"))
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        _say(f"READY {background.presence.name}")
        await background.run(stop)
    _say("STOPPED")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
