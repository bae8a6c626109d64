"""``agentq demo``: a walk-through on the embedded Redis, nothing configured.

Three agents run in this process: a planner, a researcher and a writer. The
operator dispatches one job to the planner; the planner's handler dispatches
two research jobs and a writing job that depends on both, so the writer is
released by the researchers' completion events and receives their results.
Every event is printed as it is appended to the log; at the end, the results
and the audit history of the writing job.

The demo runs as often as one likes on the same data: its own dispatches are
not rate limited (the default of 10 a minute would refuse the fourth run).
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import agentq
from agentq import embedded
from agentq._runner import WorkerSpec
from agentq.client import Client
from agentq.config import load_config, redis_configured
from agentq.consumers.handlers import Job
from agentq.eventlog.reader import RawEvent
from agentq.schemas.config import Config

AGENTS = ("planner", "researcher", "writer")
TOPIC = "event sourcing for agent queues"


async def plan(q: Client, job: Job) -> Any:
    await job.progress(10, "splitting the topic")
    angles = ["how the log is kept", "how the views are derived"]
    research = await q.dispatch_many(
        [{"target": "researcher", "task": f"Research {angle} ({TOPIC})", "label": angle,
          "parentJobId": job.id} for angle in angles],
        caller="planner",
    )
    writing = await q.dispatch(
        "writer", f"Write a summary of {TOPIC}", caller="planner", label="summary",
        depends_on=[r.job_id for r in research], parent_job_id=job.id,
    )
    await job.progress(100, "dispatched 3 jobs")
    return {"research": [r.job_id for r in research], "writing": writing.job_id}


async def research(job: Job) -> Any:
    for step in (25, 50, 75):
        await asyncio.sleep(0.15)
        await job.progress(step, "reading")
    return f"notes on {job.view.label}: every change is an event; state is a fold of them"


async def write(job: Job) -> Any:
    notes = [d.result for d in job.view.dependencies.values()]
    await asyncio.sleep(0.2)
    return "Summary: " + " | ".join(str(n) for n in notes)


def _short(job_id: str) -> str:
    return job_id.split(".")[0][-6:]


def _line(event: RawEvent, started: float) -> str:
    detail = ""
    if event.type == "JobProgress":
        detail = f"{event.data.get('percent'):>3.0f}% {event.data.get('message') or ''}"
    elif event.type == "JobDispatched":
        detail = f"by {event.data['dispatchedBy']} -> {event.data['state']}"
    elif event.type == "JobStarted":
        detail = f"attempt {event.data['attempt']}"
    elif event.type in ("JobAttemptFailed", "JobFailed"):
        detail = str(event.data.get("error", ""))[:60]
    elif event.type == "DependencyResolved":
        detail = f"…{_short(event.data['dependencyId'])} {event.data['state']}"
    short = _short(event.job_id)
    clock = f"+{time.monotonic() - started:5.2f}s"
    return f"  {clock}  {event.agent:<10} …{short}  {event.type:<18} {detail}"


async def _follow(q: Client, stop: asyncio.Event, started: float) -> None:
    """Print every event of the demo's agents as it is appended: one blocking read
    per agent's log (on a Redis Cluster each log may live on another node, and one
    read naming several would be refused)."""
    blocking = q.open_blocking()
    await asyncio.gather(*(_follow_log(q, blocking, agent, stop, started) for agent in AGENTS))


async def _follow_log(
    q: Client, blocking: Any, agent: str, stop: asyncio.Event, started: float
) -> None:
    log = q.partition(agent).log
    last: Any = await q.redis.xrevrange(log, count=1)
    position = last[0][0] if last else "0-0"
    while not stop.is_set():
        reply: Any = await blocking.xread({log: position}, block=200)
        for _, entries in reply or []:
            for entry_id, fields in entries:
                position = entry_id
                print(_line(RawEvent.parse(agent, entry_id, fields), started), flush=True)


def _unlimited(config: Config) -> Config:
    """``config`` without the rate limit and queue-depth cap, for the demo's own jobs."""
    limits = config.rate_limit.model_copy(
        update={"dispatches_per_minute": 0, "max_queue_depth": 0})
    return config.model_copy(update={"rate_limit": limits})


async def run_demo(config: Config | None = None, url: str | None = None) -> int:
    """Run the walk-through on ``url``, else the configured Redis, else the embedded
    one; 0 when every job completed."""
    started = time.monotonic()
    config = _unlimited(config or load_config())
    async with agentq.connect(url, config) as q:
        assert q.target is not None
        print(f"agentq demo: Redis at {q.target.url}\n")
        for agent in AGENTS:
            await q.add_agent(agent)
        print("agents: planner, researcher, writer (workers running in this process)")
        print("events, as they are appended to the log:")
        handlers = {"planner": lambda job: plan(q, job), "researcher": research, "writer": write}
        runner = q.runner([WorkerSpec(agent, handlers[agent], 2) for agent in AGENTS])
        stop = asyncio.Event()
        follower = asyncio.create_task(_follow(q, stop, started))
        running = asyncio.create_task(runner.run())
        try:
            await asyncio.sleep(0.1)
            root = await q.dispatch("planner", f"Plan a short report on {TOPIC}", label="plan")
            root_view, _ = await q.wait(root.job_id, timeout=20)
            if root_view.state != "completed":
                print(f"\nthe planning job {root.job_id} is {root_view.state}: "
                      f"{root_view.error or 'it did not finish in 20s'}", file=sys.stderr)
                return 1
            writing_id = root_view.result["writing"]
            final, timed_out = await q.wait(writing_id, timeout=20)
            await asyncio.sleep(0.3)
        finally:
            stop.set()
            runner.stop()
            await asyncio.gather(follower, running)
        print("\nresults:")
        for job_id in [*root_view.result["research"], writing_id]:
            view = await q.status(job_id)
            print(f"  {view.target:<10} {view.state:<9} {view.result}")
        print(f"\naudit history of the writing job {writing_id}:")
        for event in await q.history(writing_id):
            print(f"  {event.at}  {event.type:<18} actor={event.actor}")
        print(f"\ndone in {time.monotonic() - started:.1f}s. Try: agentq status {writing_id}")
        if url is None and not redis_configured(config):
            print(f"\nThe embedded Redis server keeps running, with the demo's jobs, in "
                  f"{embedded.home_dir()}; stop it with: agentq server stop")
        return 0 if final.state == "completed" and not timed_out else 1


def main() -> int:
    try:
        return asyncio.run(run_demo())
    except agentq.AgentqError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
