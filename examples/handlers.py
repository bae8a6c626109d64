"""A handler for ``agentq worker --handler MODULE:FUNC``: a plain Python function,
sync or async (a sync one runs in a thread, so a slow one does not stall the
worker), called with the job; what it returns is the job's result, and an
exception fails the attempt.

    PYTHONPATH=examples agentq worker planner --handler handlers:plan

(``MODULE`` is imported by name, so its folder must be on ``PYTHONPATH``.)
"""

from typing import Any

from agentq import Job


async def plan(job: Job) -> dict[str, Any]:
    """Split the task into steps; ``job.view`` has the whole job view."""
    await job.progress(50, "splitting the task")
    steps = [part.strip() for part in job.task.replace(" then ", ";").split(";")]
    return {"steps": [step for step in steps if step], "attempt": job.attempt}
