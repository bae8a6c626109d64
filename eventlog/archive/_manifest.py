"""A partition's manifest: its segments in order, each with its SHA-256 and the
previous one's (the hash chain), its event-id span and its job-id ranges.

One JSON file per partition (``<agent>/manifest.json``), rewritten whole by each
append::

    {"format": 1, "agent": "researcher", "segments": [
      {"seq": 1, "name": "000000000001.jsonl.gz", "first": "1764547200000-0",
       "last": "1764547260000-3", "count": 5000, "sha256": "9f…", "prev": "",
       "jobs": [["j_01KB…", "j_01KB…"]], "jobIndex": "000000000001.jobs"}]}
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Any

import orjson

from agentq.eventlog.archive._segments import EventKey, event_key
from agentq.schemas.errors import InvalidInput

MANIFEST = "manifest.json"
FORMAT = 1


@dataclass(frozen=True, slots=True)
class Segment:
    """One manifest entry: a segment file of a partition."""

    seq: int  # 1, 2, ... per partition
    name: str  # the segment file, relative to the partition's folder
    first: str  # the first and last event id it holds
    last: str
    count: int  # events (lines) in it
    sha256: str  # of the segment file's bytes, hex
    prev: str  # the previous segment's sha256 ("" for seq 1)
    # The job index: the job ids it holds, as at most a few (first, last) ranges,
    # and the sidecar file listing each of them.
    jobs: tuple[tuple[str, str], ...] = ()
    job_index: str = ""

    def may_hold(self, job_id: str) -> bool | None:
        """Whether the segment holds events of ``job_id``: False when no range covers
        it, True when a one-id range is it, None when only the sidecar can tell
        (also when the entry has no ranges)."""
        if not self.jobs:
            return None
        for low, high in self.jobs:
            if low <= job_id <= high:
                return True if low == high else None
        return False

    def wire(self) -> dict[str, Any]:
        return {"seq": self.seq, "name": self.name, "first": self.first, "last": self.last,
                "count": self.count, "sha256": self.sha256, "prev": self.prev,
                "jobs": [list(pair) for pair in self.jobs], "jobIndex": self.job_index}

    @classmethod
    def of_wire(cls, entry: dict[str, Any]) -> Segment:
        """The entry read back; ``ValueError`` (or ``KeyError``/``TypeError``) when it
        is not one."""
        return cls(int(entry["seq"]), str(entry["name"]), str(entry["first"]),
                   str(entry["last"]), int(entry["count"]), str(entry["sha256"]),
                   str(entry["prev"]),
                   tuple((str(low), str(high)) for low, high in entry.get("jobs", ())),
                   str(entry.get("jobIndex", "")))


@dataclass(frozen=True)
class Manifest:
    """A partition's segments in order. Its keys are precomputed for range look-ups."""

    agent: str
    segments: tuple[Segment, ...] = ()
    _lasts: list[EventKey] = field(default_factory=list, repr=False, compare=False)
    _firsts: list[EventKey] = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Also checks that every first and last is an event id (InvalidInput).
        self._lasts.extend(event_key(segment.last) for segment in self.segments)
        self._firsts.extend(event_key(segment.first) for segment in self.segments)

    @property
    def last(self) -> Segment | None:
        return self.segments[-1] if self.segments else None

    def extended(self, segment: Segment) -> Manifest:
        return Manifest(self.agent, (*self.segments, segment))

    def between(self, after: EventKey | None, until: EventKey | None) -> tuple[Segment, ...]:
        """The segments holding events after ``after`` (exclusive) up to ``until``
        (inclusive), by the manifest alone (assumes the order the chain records)."""
        start = 0 if after is None else bisect_right(self._lasts, after)
        stop = len(self.segments) if until is None else bisect_right(self._firsts, until)
        return self.segments[start:stop]

    def to_json(self) -> bytes:
        return orjson.dumps({"format": FORMAT, "agent": self.agent,
                             "segments": [segment.wire() for segment in self.segments]})

    @classmethod
    def of_json(cls, data: bytes) -> Manifest:
        """The manifest read back; ``ValueError`` when it is not one this version
        reads."""
        try:
            body = orjson.loads(data)
            if not isinstance(body, dict):
                raise ValueError("not a JSON object")
            if body.get("format") != FORMAT:
                raise ValueError(f"format {body.get('format')!r}, not {FORMAT}")
            return cls(str(body["agent"]),
                       tuple(Segment.of_wire(entry) for entry in body["segments"]))
        except (KeyError, TypeError, ValueError, InvalidInput) as exc:
            raise ValueError(f"not an archive manifest: {exc}") from exc
