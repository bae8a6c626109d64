"""Events set aside on disk (``projections/spill.py``) come back job by job, each
job's in the order added, whatever the number of files and splits."""

from __future__ import annotations

import os
import subprocess
import sys

import orjson
import pytest

from agentq.eventlog.reader import RawEvent
from agentq.projections import spill
from agentq.projections.spill import Spill


def event(n: int, job: int, *, parsed: bool = False) -> RawEvent:
    data = {"attempt": n, "note": f"line {n}\n\t\x1f"}
    if parsed:  # as an archived event comes: data given, upcast already
        return RawEvent(f"1-{n}", "a", "JobProgress", f"j_{job}.a", 1000 + n, "w", 1, data=data)
    raw = orjson.dumps(data).decode()
    return RawEvent(f"1-{n}", "a", "JobProgress", f"j_{job}.a", 1000 + n, "w", 1, raw=raw,
                    quiet=n % 2 == 0)


@pytest.mark.parametrize("read_whole", [10_000, 7])
def test_each_jobs_events_come_back_in_order(monkeypatch: pytest.MonkeyPatch,
                                             read_whole: int) -> None:
    """300 events of 30 jobs, interleaved; with a file read whole past 7 events,
    every file is split again (and again, up to the limit)."""
    monkeypatch.setattr(spill, "READ_WHOLE", read_whole)
    added = [event(n, n % 30, parsed=n % 3 == 0) for n in range(300)]
    with Spill("a") as aside:
        for e in added:
            aside.add(e)
        jobs = list(aside.jobs())
    assert sorted(len(events) for events in jobs) == [10] * 30
    for events in jobs:
        job_id = events[0].job_id
        assert events == [e for e in added if e.job_id == job_id]  # ids, times, data
        assert [e.quiet for e in events] == [e.quiet for e in added if e.job_id == job_id]


ORDER = """
from agentq.eventlog.reader import RawEvent
from agentq.projections.spill import Spill
with Spill("a") as aside:
    for n in range(200):
        aside.add(RawEvent(f"1-{n}", "a", "JobProgress", f"j_{n % 50}.a", n, "w", 1, raw="{}"))
    print(" ".join(events[0].job_id for events in aside.jobs()))
"""


def test_the_order_of_jobs_is_the_same_in_every_process() -> None:
    """Python's own string hash differs from one process to the next; a report's
    order must not."""
    orders = {subprocess.run([sys.executable, "-c", ORDER], capture_output=True, text=True,
                             check=True, env={**os.environ, "PYTHONHASHSEED": seed}).stdout
              for seed in ("1", "2", "3")}
    assert len(orders) == 1 and len(next(iter(orders)).split()) == 50
