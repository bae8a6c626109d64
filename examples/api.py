"""agentq from Python: dispatch a job, run a worker until the job ends, stop it.

    python examples/api.py          # on the embedded Redis, like the CLI
"""

import asyncio

import agentq


async def research(job: agentq.Job) -> dict[str, str]:
    """The handler: sync or async; ``job.view`` has the whole job."""
    await job.progress(50, "halfway")
    return {"summary": f"notes on {job.task}"}


async def main() -> None:
    async with agentq.connect() as q:  # or agentq.connect("redis://host:6379/0")
        await q.add_agent("researcher")
        job = await q.dispatch("researcher", "the event log", caller="planner")
        print("dispatched", job.job_id, job.state)

        worker = q.worker("researcher", research, concurrency=10)
        running = asyncio.create_task(worker.run())  # runs until worker.stop()
        view, timed_out = await q.wait(job.job_id, timeout=60)
        worker.stop()
        await running  # lets jobs in flight finish

        print("timed out" if timed_out else view.state, view.result)
        for event in await q.history(job.job_id):
            print(" ", event.type)


if __name__ == "__main__":
    asyncio.run(main())
