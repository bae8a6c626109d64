"""The golden log: a committed log every reader of this code must still understand.

``tests/golden/log.json`` holds events the Lua scripts wrote (every type, in
each of its variants) and ``expected.json`` the state records the scripts kept
for them; ``tests/golden/make_golden.py`` regenerates both from a live server.
These tests need no Redis: they fold the stored log and read it as ``history``
and ``replay`` print it, so a change to the fold, the event models or the
upcasting that no longer reads what was written fails here.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
import pytest

from agentq.eventlog import fold
from agentq.eventlog.reader import RawEvent
from agentq.schemas.events import (
    CURRENT_VERSIONS,
    EVENT_MODELS,
    STATE_AFTER,
    UPCASTERS,
    StoredEvent,
)
from agentq.schemas.job import LEGAL_TRANSITIONS

GOLDEN = Path(__file__).parent / "golden"


def _load_maker() -> Any:
    spec = importlib.util.spec_from_file_location("make_golden", GOLDEN / "make_golden.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_golden = _load_maker()


# Part one's scenario, then part two's (approvals, cancelling a tree): read as
# one log, whose jobs are each in one of them.
_STEMS = ("", "approvals_")


def _log() -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    for stem in _STEMS:
        entries += json.loads((GOLDEN / f"{stem}log.json").read_text())
    return entries


def _expected() -> dict[str, dict[str, Any]]:
    records: dict[str, dict[str, Any]] = {}
    for stem in _STEMS:
        records.update(json.loads((GOLDEN / f"{stem}expected.json").read_text()))
    return records


def _fields(entry: Mapping[str, Any]) -> dict[str, str]:
    """A golden entry as the stream entry's fields, exactly as Redis hands them back."""
    return {
        "type": entry["type"],
        "jobId": entry["job_id"],
        "v": str(entry["v"]),
        "at": str(entry["at"]),
        "actor": entry["actor"],
        "data": orjson.dumps(entry["data"]).decode(),
    }


def _parse(entry: Mapping[str, Any]) -> RawEvent:
    return RawEvent.parse(entry["agent"], entry["event_id"], _fields(entry))


def _events() -> list[RawEvent]:
    return [_parse(entry) for entry in _log()]


def test_parsing_keeps_every_field() -> None:
    for entry, event in zip(_log(), _events(), strict=True):
        assert make_golden.raw_form(event) == entry


def test_fold_rebuilds_the_expected_records() -> None:
    rebuilt = fold.records_from(_events())
    expected = _expected()
    assert sorted(rebuilt) == sorted(expected)
    for job_id, record in expected.items():
        assert rebuilt[job_id] == record, job_id


def test_fold_of_each_partition_alone_gives_its_jobs() -> None:
    """Partitions are independent: folding one partition's events rebuilds its jobs."""
    events = _events()
    expected = _expected()
    for agent in {e.agent for e in events}:
        mine = [e for e in events if e.agent == agent]
        rebuilt = fold.records_from(mine)
        assert rebuilt == {j: r for j, r in expected.items() if r["spec"]["target"] == agent}


def test_log_covers_every_event_type_and_variant() -> None:
    events = _events()
    assert {e.type for e in events} == set(EVENT_MODELS)
    covered = {(e.type, make_golden.variant(e.type, e.data)) for e in events}
    required = make_golden.REQUIRED | make_golden.REQUIRED_APPROVALS
    assert covered >= required, sorted(required - covered)
    assert all(e.v == CURRENT_VERSIONS[e.type] for e in events), (
        "a type's version changed: keep this log (old versions must stay readable) and add "
        "an upcaster; regenerate only to cover new kinds of events"
    )


@pytest.mark.parametrize("index", range(len(_log())))
def test_stored_event_validates_against_its_model(index: int) -> None:
    event = _events()[index]
    stored = event.stored()
    assert StoredEvent.model_validate(stored.wire()) == stored
    model = EVENT_MODELS[stored.type]
    parsed = model.model_validate(stored.data)
    # Nothing is dropped or invented on the way: the model gives the data back.
    assert parsed.model_dump(mode="json", by_alias=True, exclude_unset=True) == stored.data
    if "runAt" in event.data:
        assert stored.data["runAt"].endswith("Z"), stored.data["runAt"]
        assert stored.data["runAt"] != event.data["runAt"]


def test_state_changes_follow_the_transition_table() -> None:
    """Walking each job's events through STATE_AFTER: legal moves, ending in the
    state the scripts recorded."""
    expected = _expected()
    by_job: dict[str, list[RawEvent]] = {}
    for event in _events():
        by_job.setdefault(event.job_id, []).append(event)
    for job_id, events in by_job.items():
        state: str | None = None
        for event in events:
            after = STATE_AFTER[event.type]
            if after == "data":
                after = event.data["state"]
            if after is None:
                continue
            assert after in LEGAL_TRANSITIONS[state], (job_id, event.type, state, after)
            state = after
        assert state == expected[job_id]["state"], job_id


def test_an_upcaster_for_an_older_version_is_applied_on_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A made-up version 0 of JobQueued (``{"cause": …}``) is read as today's
    version through the upcaster registered for it, and the fold still gives
    the expected records."""
    entries = _log()
    index = next(i for i, e in enumerate(entries) if e["type"] == "JobQueued")
    current = dict(entries[index]["data"])
    old = {
        **entries[index],
        "v": CURRENT_VERSIONS["JobQueued"] - 1,
        "data": {"cause": current["reason"]},
    }
    before = dict(UPCASTERS)

    with pytest.raises(ValueError, match="no upcaster"):
        _parse(old).data  # noqa: B018 (data is parsed and upcast when first read)

    calls: list[dict[str, Any]] = []

    def v0_to_v1(data: dict[str, Any]) -> dict[str, Any]:
        calls.append(data)
        return {"reason": data["cause"]}

    with monkeypatch.context() as patch:
        patch.setitem(UPCASTERS, ("JobQueued", old["v"]), v0_to_v1)
        event = _parse(old)
        assert event.data == current
        assert calls == [{"cause": current["reason"]}]
        assert event.v == old["v"]  # the version it was written with stays visible
        EVENT_MODELS["JobQueued"].model_validate(event.stored().data)
        events = [_parse(old if i == index else e) for i, e in enumerate(entries)]
        assert fold.records_from(events) == _expected()

    assert before == UPCASTERS
    with pytest.raises(ValueError, match="no upcaster"):
        _parse(old).data  # noqa: B018
