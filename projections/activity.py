"""``activity``: what each agent is doing.

It reads, per partition, what the transition scripts keep current themselves
(``activity.lua``: counts, live workers, active jobs with their specs, the
time of the log's last event), one script call per partition, all in one
round trip (one per node on a cluster): nothing has to catch up first, and
nothing is read one partition at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
from redis.asyncio import Redis

from agentq.eventlog.keys import Keys
from agentq.eventlog.scripts import Scripts
from agentq.schemas._base import micros_to_iso

# Characters of a task shown in lists and current jobs.
TASK_PREVIEW = 80
_COUNTED = ("queued", "active", "delayed", "waitingDependencies", "completed", "failed")


async def activity(redis: Redis, keys: Keys, agents: Sequence[str]) -> dict[str, Any]:
    """SPEC's queue_activity output for ``agents``: one script call per partition,
    all in one round trip (per node on a cluster)."""
    parts = [keys.partition(agent) for agent in agents]
    calls = [Scripts.activity_call(part) for part in parts]
    replies = await Scripts(redis).call_many(calls) if calls else []
    out: dict[str, Any] = {}
    summary: dict[str, int] = dict.fromkeys(
        ("agents", "offline", "idle", "working", *_COUNTED), 0
    )
    for part, reply in zip(parts, replies, strict=True):
        read = Scripts.activity_outcome(reply)
        counts, workers = read.counts, read.workers
        active = counts.get("active", 0)
        status = "offline" if workers == 0 else ("working" if active > 0 else "idle")
        entry: dict[str, Any] = {
            "status": status,
            "queued": counts.get("queued", 0),
            "delayed": counts.get("delayed", 0),
            "waitingDependencies": counts.get("waiting_dependencies", 0),
            "active": active,
            "completed": counts.get("completed", 0),
            "failed": counts.get("failed", 0),
            "currentJobs": _current_jobs(read.active),
            "lastActivityAt": micros_to_iso(read.last_at) if read.last_at else None,
            "workers": workers,
        }
        out[part.agent] = entry
        summary["agents"] += 1
        summary[status] += 1
        for name in _COUNTED:
            summary[name] += entry[name]
    return {"agents": out, "summary": summary}


def _current_jobs(active: Sequence[tuple[str, str | None]]) -> list[dict[str, Any]]:
    jobs = []
    for job_id, spec_json in sorted(active):
        if spec_json:
            spec = orjson.loads(spec_json)
            jobs.append({"jobId": job_id, "label": spec.get("label"),
                         "task": spec["task"][:TASK_PREVIEW]})
    return jobs
