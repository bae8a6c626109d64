"""The spec a dispatch input is stored with: defaults applied, empty and
default fields left out, in a fixed order."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from agentq._admission import prepare
from agentq.schemas.config import Config
from agentq.schemas.tools import DispatchInput

CONFIG = Config.model_validate({"agents": {"a": {"maxAttempts": 5, "timeoutSeconds": 0}}})


def reference_spec(inp: DispatchInput, caller: str, depth: int) -> dict[str, Any]:
    """Every optional field looked at, None and defaults dropped."""
    agent = CONFIG.agents.get(inp.target)
    timeout = inp.timeout_seconds
    if timeout is None:
        timeout = agent.timeout_seconds if agent and agent.timeout_seconds is not None else None
    if timeout is None:
        timeout = CONFIG.jobs.timeout_seconds
    spec = {"target": inp.target, "dispatchedBy": caller, "task": inp.task,
            "maxAttempts": inp.max_attempts or (agent and agent.max_attempts)
            or CONFIG.jobs.max_attempts}
    optional = {
        "label": inp.label, "project": inp.project, "model": inp.model,
        "thinking": inp.thinking, "timeoutSeconds": timeout or None,
        "priority": None if inp.priority == "normal" else inp.priority,
        "dependsOn": inp.depends_on or None,
        "onDependencyFailure": None if inp.on_dependency_failure == "fail" else "ignore",
        "idempotencyKey": inp.idempotency_key, "parentJobId": inp.parent_job_id,
        "depth": depth or None, "announce": inp.announce or None,
        "sessionKey": inp.session_key, "origin": inp.origin, "metadata": inp.metadata,
    }
    spec.update({k: v for k, v in optional.items() if v is not None})
    return spec


text = st.text(max_size=5)
inputs = st.fixed_dictionaries(
    {"target": st.sampled_from(["a", "b"]), "task": st.text(min_size=1, max_size=5)},
    optional={
        "label": st.none() | text, "project": st.none() | text, "model": st.none() | text,
        "thinking": st.none() | text, "timeoutSeconds": st.none() | st.integers(0, 100),
        "maxAttempts": st.none() | st.integers(1, 20),
        "priority": st.sampled_from(["high", "normal", "low"]),
        "delaySeconds": st.integers(0, 10),
        "dependsOn": st.lists(st.sampled_from(["x", "y"]), unique=True),
        "onDependencyFailure": st.sampled_from(["fail", "ignore"]),
        "idempotencyKey": st.none() | st.text(min_size=1, max_size=5),
        "metadata": st.none() | st.dictionaries(text, st.integers(0, 9), max_size=2),
        "origin": st.none() | st.dictionaries(text, text, max_size=2),
        "sessionKey": st.none() | text, "parentJobId": st.none() | text,
        "announce": st.booleans(),
    },
)


@given(inputs, st.integers(0, 3))
def test_spec_keeps_what_differs_from_the_defaults(raw: dict[str, Any], depth: int) -> None:
    for inp in (DispatchInput.model_validate(raw), DispatchInput(**raw)):
        prepared = prepare(inp, "caller", depth, CONFIG)
        expected = reference_spec(inp, "caller", depth)
        assert prepared.spec == expected
        assert list(prepared.spec) == list(expected)  # the stored order
