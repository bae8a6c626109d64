"""State records read as job views: the fast path of ``to_view`` gives exactly
the view that validating every field would give."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st

from agentq.eventlog.records import denormalize, normalize, to_view
from agentq.schemas._base import micros_to_iso
from agentq.schemas.job import STATES, JobView, Progress

TIMES = ("createdAt", "queuedAt", "startedAt", "finishedAt", "runAt")


def reference_view(job_id: str, record: dict[str, str], with_session_key: bool) -> JobView:
    """Every field of the view spelled out and validated."""
    spec = orjson.loads(record["spec"])
    result, progress = record.get("result"), record.get("progress")
    return JobView.model_validate({
        "jobId": job_id, "target": spec["target"], "dispatchedBy": spec["dispatchedBy"],
        "task": spec["task"], "label": spec.get("label"), "project": spec.get("project"),
        "state": record["state"], "attempt": int(record["attempt"]),
        "maxAttempts": int(record["maxAttempts"]), "priority": spec.get("priority", "normal"),
        "model": spec.get("model"), "thinking": spec.get("thinking"),
        "timeoutSeconds": spec.get("timeoutSeconds", 0),
        "dependsOn": spec.get("dependsOn", []),
        "waitingForDependencies": record["state"] == "waiting_dependencies",
        "onDependencyFailure": spec.get("onDependencyFailure", "fail"),
        "result": orjson.loads(result) if result is not None else None,
        "error": record.get("error"),
        "progress": Progress.model_validate_json(progress) if progress else None,
        **{name: micros_to_iso(int(record[name])) if name in record else None for name in TIMES},
        "idempotencyKey": spec.get("idempotencyKey"), "parentJobId": spec.get("parentJobId"),
        "depth": spec.get("depth", 0), "announce": spec.get("announce", False),
        "sessionKey": spec.get("sessionKey") if with_session_key else None,
        "origin": spec.get("origin"), "metadata": spec.get("metadata"),
    })


text = st.text(min_size=1, max_size=8)
small_int = st.integers(-(2**53), 2**53)
optional_spec = st.fixed_dictionaries({}, optional={
    "label": text, "project": text, "model": text, "thinking": text,
    "timeoutSeconds": st.one_of(st.integers(1, 10_000), st.floats(0.5, 1e4)),
    "priority": st.sampled_from(["high", "low"]),
    "dependsOn": st.lists(st.just("j_01KAS4X0000000000000000000.a"), min_size=1, max_size=2),
    "onDependencyFailure": st.just("ignore"), "idempotencyKey": text,
    "parentJobId": st.just("j_01KAS4X0000000000000000001.b"), "depth": st.integers(1, 5),
    "announce": st.just(True), "sessionKey": text,
    "origin": st.dictionaries(text, text, max_size=2),
    "metadata": st.dictionaries(text, small_int, max_size=2),
})
json_value = st.one_of(st.none(), small_int, text, st.lists(small_int, max_size=3))


@st.composite
def records(draw: Any) -> dict[str, str]:
    spec = {"target": "a", "dispatchedBy": "b", "task": draw(text), "maxAttempts": 3,
            **draw(optional_spec)}
    record = {"spec": orjson.dumps(spec).decode(), "state": draw(st.sampled_from(STATES)),
              "attempt": str(draw(st.integers(0, 5))), "maxAttempts": "3"}
    for name in TIMES:
        if name == "createdAt" or draw(st.booleans()):
            record[name] = str(draw(st.integers(1_600_000_000_000_000, 1_900_000_000_000_000)))
    if draw(st.booleans()):
        record["result"] = orjson.dumps(draw(json_value)).decode()
    if draw(st.booleans()):
        record["error"] = draw(text)
    if draw(st.booleans()):
        record["progress"] = orjson.dumps({"percent": draw(st.integers(0, 100))}).decode()
    return record


@given(records(), st.booleans())
def test_view_equals_the_fully_validated_view(record: dict[str, str], session: bool) -> None:
    job_id = "j_01KAS4X0000000000000000002.a"
    view = to_view(job_id, record, with_session_key=session)
    expected = reference_view(job_id, record, session)
    assert view == expected
    assert view.wire() == expected.wire()


@given(records(), st.booleans())
def test_a_normalized_record_reads_back_as_the_same_view(
    record: dict[str, str], session: bool
) -> None:
    job_id = "j_01KAS4X0000000000000000003.a"
    again = denormalize(normalize(record))
    assert normalize(again) == normalize(record)
    assert to_view(job_id, again, with_session_key=session) == to_view(
        job_id, record, with_session_key=session)
