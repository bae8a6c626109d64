"""The committed JSON Schemas match the models; the models hold SPEC's shapes."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from agentq.schemas import export
from agentq.schemas.events import CURRENT_VERSIONS, EVENT_MODELS, STATE_AFTER
from agentq.schemas.job import JobView
from agentq.schemas.tools import DispatchInput


def test_committed_json_schemas_are_current() -> None:
    assert export.stale() == [], "run `python -m agentq.schemas.export` and commit schemas/json/"


def test_every_event_type_has_a_model_a_version_and_a_state_rule() -> None:
    assert set(EVENT_MODELS) == set(CURRENT_VERSIONS) == set(STATE_AFTER)
    assert len(EVENT_MODELS) == 14  # part one's 12, JobApproved and JobRejected


def test_wire_names_are_camel_case() -> None:
    fields = set(JobView.model_json_schema(by_alias=True)["properties"])
    assert {"jobId", "dispatchedBy", "waitingForDependencies", "onDependencyFailure",
            "timeoutSeconds", "parentJobId", "sessionKey"} <= fields


@pytest.mark.parametrize(
    "bad",
    [
        {"target": "Bad", "task": "x"},
        {"target": "a", "task": ""},
        {"target": "a", "task": "x", "maxAttempts": 21},
        {"target": "a", "task": "x", "dependsOn": ["j1"] * 21},
        {"target": "a", "task": "x", "unknownField": 1},
    ],
)
def test_dispatch_input_refuses_bad_input(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        DispatchInput.model_validate(bad)


def test_models_are_frozen() -> None:
    inp = DispatchInput.model_validate({"target": "a", "task": "x"})
    with pytest.raises(ValidationError):
        inp.task = "y"  # type: ignore[misc]
