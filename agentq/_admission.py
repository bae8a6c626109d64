"""Turning dispatch inputs into jobs: defaults, the spec each job is stored
with, and the slow path that reports a refusal with the first of SPEC's
checks that fails."""

from __future__ import annotations

from typing import Any, NamedTuple, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from pydantic.alias_generators import to_camel

from agentq.eventlog.ids import new_job_id
from agentq.eventlog.keys import PRIORITY_CODES
from agentq.eventlog.records import view_of_spec
from agentq.eventlog.scripts import NewJob
from agentq.schemas.config import Config
from agentq.schemas.errors import InvalidInput
from agentq.schemas.job import JobView
from agentq.schemas.tools import DispatchInput

M = TypeVar("M", bound=BaseModel)


def parse_model(model: type[M], raw: M | dict[str, Any], where: str = "") -> M:
    """A validated tool input; InvalidInput naming the first bad field's path."""
    if isinstance(raw, model):
        return raw
    try:
        return model.model_validate(raw)
    except InvalidInput as exc:  # what JSON cannot carry, found before the fields
        if not where:
            raise
        path = where + (exc.path or "")
        raise InvalidInput(exc.message.replace(f": {exc.path}:", f": {path}:", 1),
                           path=path) from exc
    except ValidationError as exc:
        error = exc.errors()[0]
        path = where + ".".join(to_camel(p) if isinstance(p, str) else str(p) for p in error["loc"])
        raise InvalidInput(f"Invalid input: {path}: {error['msg']}", path=path) from exc


def parse_input(raw: DispatchInput | dict[str, Any], where: str = "") -> DispatchInput:
    """A validated dispatch input; InvalidInput naming the bad field's path."""
    return parse_model(DispatchInput, raw, where)


def allowed(allow: list[str], target: str) -> bool:
    return "*" in allow or target in allow


class Prepared(NamedTuple):
    """One dispatch input made ready for the dispatch script."""

    input: DispatchInput
    job: NewJob
    spec: dict[str, Any]


# The optional fields of a spec, in the order they are stored, and the values
# it leaves out besides None (readers apply the defaults).
_SPEC_ORDER = (
    ("label", "label"), ("project", "project"), ("model", "model"), ("thinking", "thinking"),
    ("timeout_seconds", "timeoutSeconds"), ("priority", "priority"),
    ("depends_on", "dependsOn"), ("on_dependency_failure", "onDependencyFailure"),
    ("idempotency_key", "idempotencyKey"), ("parent_job_id", "parentJobId"),
    ("depth", "depth"), ("announce", "announce"), ("session_key", "sessionKey"),
    ("origin", "origin"), ("metadata", "metadata"),
)
_LEFT_OUT: dict[str, Any] = {
    "priority": "normal", "depends_on": [], "on_dependency_failure": "fail", "announce": False,
}


def prepare(inp: DispatchInput, caller: str, depth: int, config: Config) -> Prepared:
    """The job a valid input makes: its id, defaults applied, its stored spec.

    The spec leaves out empty and default fields; readers apply the defaults.
    """
    agent = config.agents.get(inp.target)
    max_attempts = inp.max_attempts or (agent and agent.max_attempts) or config.jobs.max_attempts
    timeout = inp.timeout_seconds
    if timeout is None:
        timeout = agent.timeout_seconds if agent and agent.timeout_seconds is not None else None
    if timeout is None:
        timeout = config.jobs.timeout_seconds
    spec: dict[str, Any] = {
        "target": inp.target,
        "dispatchedBy": caller,
        "task": inp.task,
        "maxAttempts": max_attempts,
    }
    given = inp.model_fields_set
    for name, key in _SPEC_ORDER:
        if name == "timeout_seconds":
            value: Any = timeout or None
        elif name == "depth":
            value = depth or None
        elif name in given:
            value = getattr(inp, name)
            if value == _LEFT_OUT.get(name):
                continue
        else:
            continue  # a default: the spec leaves it out
        if value is not None:
            spec[key] = value
    requires_approval = inp.requires_approval
    if requires_approval is None:
        requires_approval = bool(agent and agent.requires_approval)
    if requires_approval:
        spec["requiresApproval"] = True
    job = NewJob(
        job_id=new_job_id(inp.target),
        spec_json=orjson.dumps(spec),
        max_attempts=max_attempts,
        priority=inp.priority,
        delay_ms=round(inp.delay_seconds * 1000),
        idempotency_key=inp.idempotency_key,
        depends_on=inp.depends_on,
        caller=caller,
        requires_approval=requires_approval,
    )
    return Prepared(inp, job, spec)


def _written(prepared: Prepared, state: str, at: int) -> dict[str, Any]:
    """The record fields the dispatch script writes that a view shows."""
    record: dict[str, Any] = {"state": state, "attempt": "0",
                              "maxAttempts": str(prepared.job.max_attempts), "createdAt": at}
    if state == "queued":
        record["queuedAt"] = at
    elif prepared.job.delay_ms > 0:
        # Delayed, or waiting with a delay that the release will honour.
        record["runAt"] = at + prepared.job.delay_ms * 1000
    return record


def dispatched_view(prepared: Prepared, state: str, at: int, with_session_key: bool) -> JobView:
    """The view of a job the dispatch script just wrote, made without a read."""
    return view_of_spec(prepared.job.job_id, prepared.spec, _written(prepared, state, at),
                        with_session_key=with_session_key)


def dispatched_record(prepared: Prepared, state: str, at: int, event_id: str) -> dict[str, str]:
    """The whole state record the dispatch script wrote (as a read returns it, with
    its spec), made without a read."""
    record = {name: str(value) for name, value in _written(prepared, state, at).items()}
    record.update(budgetFrom="0", prio=PRIORITY_CODES[prepared.job.priority], events=event_id,
                  spec=prepared.job.spec_json.decode())
    return record
