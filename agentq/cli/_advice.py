"""What to do next: the lines the CLI adds on standard error after a refusal.

SPEC fixes the tools' messages (``Unknown target agent: <id>``), and ``--json``
prints them unchanged; a person at a terminal also gets the next step: the
command that fixes it, or the setting that changes it.
"""

from __future__ import annotations

from agentq.cli._base import PROG, Run, snake_case
from agentq.schemas.errors import AgentqError, NotFound, QueueFull, RateLimited, UnknownAgent
from agentq.schemas.words import agent_of_job

__all__ = ["explain"]

_JOB_ID_SHAPE = "j_<26 letters and digits>.<agent>, as dispatch prints it"


def explain(error: AgentqError, run: Run | None) -> tuple[str, list[str]]:
    """The headline to print for ``error`` and the hints that follow it."""
    headline, hints = error.message, []
    if isinstance(error, UnknownAgent):
        if _command(run) == "agents remove":
            hints.append(f"the known agents: {PROG} agents list")
        else:
            hints.append(f"register it with: {PROG} agents add {error.agent}")
    elif isinstance(error, RateLimited):
        hints.append(_setting("rateLimit.dispatchesPerMinute", error.limit,
                              "dispatches per caller in a rolling minute"))
    elif isinstance(error, QueueFull):
        hints.append(_setting("rateLimit.maxQueueDepth", error.limit,
                              "queued, delayed and active jobs per agent"))
    elif (isinstance(error, NotFound) and error.job_id is not None
          and agent_of_job(error.job_id) is None):
        headline = f"{error.job_id!r} is not a job id: a job id looks like {_JOB_ID_SHAPE}"
    if run is not None and run.started_server is not None and isinstance(
        error, (NotFound, UnknownAgent)
    ):
        hints.append(
            f"this command found no server running and started a new one in "
            f"{run.started_server.home}: if your data is elsewhere, run from the directory "
            f"that holds it or set AGENTQ_HOME"
        )
    return headline, hints


def _command(run: Run | None) -> str:
    if run is None:
        return ""
    words = [getattr(run.args, "command", None)]
    words.append(getattr(run.args, f"{words[0]}_command", None))
    return " ".join(w for w in words if w)


def _setting(path: str, value: int, what: str) -> str:
    variable = "AGENTQ_" + "__".join(snake_case(part).upper() for part in path.split("."))
    return (f"the limit is {path} = {value} ({what}; 0 = unlimited): change it in the "
            f"config file or with {variable}")
