"""A worker process for the subprocess tests (a stand-in for `agentq worker`).

Usage: python tests/worker_proc.py URL CONFIG_JSON AGENT KIND ARG [CONCURRENCY]

- CONFIG_JSON: the whole config as JSON (camelCase; it carries the key prefix).
- KIND: ``exec`` (ARG a shell command), ``http`` (ARG a URL) or ``python``
  (ARG ``MODULE:FUNC``; this file's handlers are ``worker_proc:<name>``).

Prints ``READY <worker id>`` once the worker is registered and taking jobs,
``STOPPING`` when SIGTERM arrives (then it calls ``run.stop()``: no new jobs,
running ones finish within ``workers.shutdownGraceSeconds``), and ``STOPPED``
just before it exits 0.

The module also holds small handlers the tests load with ``python_handler``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agentq.consumers.handlers import Job

# Run as a script, the project root is not on the path (only tests/ is).
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))


# -- handlers (loaded as worker_proc:<name>) ----------------------------------


async def sleep_long(job: Job) -> str:
    """Sleeps far longer than any test waits: used to kill a worker mid-job."""
    await asyncio.sleep(30)
    return "slept"


async def sleep_briefly(job: Job) -> str:
    """A job of about 1.5 s: long enough to send SIGTERM while it runs."""
    await asyncio.sleep(1.5)
    return f"done {job.task}"


def die(job: Job) -> None:
    """A poison job: takes the whole worker process down."""
    os._exit(1)


def sync_upper(job: Job) -> str:
    """A sync handler (it runs in a thread)."""
    time.sleep(0.05)
    return job.task.upper()


async def async_info(job: Job) -> dict[str, Any]:
    """An async handler returning structured data and reporting progress."""
    await job.progress(50, "half")
    await asyncio.sleep(0.01)
    return {"id": job.id, "task": job.task, "attempt": job.attempt}


def sync_raises(job: Job) -> None:
    raise ValueError(f"sync handler refused {job.task}")


async def async_raises(job: Job) -> None:
    await asyncio.sleep(0)
    raise RuntimeError("async handler broke")


# -- the process ---------------------------------------------------------------


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def main(argv: list[str]) -> int:
    import agentq
    from agentq.consumers.handlers import exec_handler, http_handler, python_handler
    from agentq.schemas.config import Config

    url, config_json, agent, kind, arg = argv[:5]
    concurrency = int(argv[5]) if len(argv) > 5 else 1
    config = Config.model_validate_json(config_json)
    if kind == "exec":
        handler = exec_handler(arg)
    elif kind == "http":
        handler = http_handler(arg)
    elif kind == "python":
        handler = python_handler(arg)
    else:
        raise SystemExit(f"unknown handler kind {kind!r}")

    async with agentq.connect(url, config) as q:
        run = q.worker(agent, handler, concurrency=concurrency)

        def on_sigterm() -> None:
            run.stop()
            _say("STOPPING")

        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, on_sigterm)
        task = asyncio.create_task(run.run())
        part = q.partition(agent)
        while not task.done():
            worker = run.worker
            if worker is not None and await q.redis.zscore(part.workers, worker.worker_id):
                _say(f"READY {worker.worker_id}")
                break
            await asyncio.sleep(0.01)
        await task
    _say("STOPPED")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
