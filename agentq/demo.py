"""A short walk-through on the embedded Redis: register an agent, dispatch,
read the status and the audit history. (The full demo with workers and a
dependency graph replaces this as those parts land.)"""

from __future__ import annotations

import asyncio
import sys

import agentq
from agentq.config import load_config


async def run_demo() -> int:
    config = load_config()
    async with agentq.connect(config=config) as q:
        assert q.target is not None
        print(f"agentq demo on {q.target.url}")
        await q.add_agent("researcher")
        job = await q.dispatch("researcher", "Summarise the last week of issues", caller="main",
                               label="weekly summary")
        print(f"dispatched {job.job_id} to {job.target}: {job.state}")
        view = await q.status(job.job_id)
        print(f"status: {view.state}, attempt {view.attempt}/{view.max_attempts}")
        print("history:")
        for event in await q.history(job.job_id):
            print(f"  {event.at}  {event.type:<14} by {event.actor}")
        await q.cancel(job.job_id)
        print(f"cancelled: {(await q.status(job.job_id)).state}")
    return 0


def main() -> int:
    try:
        return asyncio.run(run_demo())
    except agentq.AgentqError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
