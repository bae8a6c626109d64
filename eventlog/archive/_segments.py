"""A segment's bytes: its lines in, gzip-compressed JSON Lines out, its digest, its
job index; and the way back.

A segment file is ``gzip`` of the events as ``replay`` prints them, one JSON
object a line, each line ended by ``\\n``; ``zcat <file> | jq`` reads it. The
gzip header carries no time or name, so the same lines always make the same
bytes (and the same SHA-256). Its job index (the "sidecar") is plain text: the
distinct job ids of the segment, sorted, one a line.
"""

from __future__ import annotations

import gzip
import hashlib
import heapq
import itertools
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from agentq.eventlog.ids import job_id_time_ms
from agentq.schemas.errors import InvalidInput

# zlib's default. On events of ~310 bytes, one core here: ~160,000 events/s to
# 42 bytes each; level 9 67,000/s to 41; level 3 400,000/s to 48.
COMPRESSION_LEVEL = 6
# The JSON keys of an event as ``replay`` prints it that the archive reads back.
EVENT_ID_KEY = "eventId"
JOB_ID_KEY = "jobId"
# How many job-id ranges a segment's manifest entry keeps (see ``job_ranges``).
MOST_RANGES = 4

EventKey = tuple[int, int]


def event_key(event_id: str) -> EventKey:
    """An event id ``"<ms>-<seq>"`` as the pair of integers it is ordered by
    (never compare ids as strings: ``"9-0" > "10-0"``)."""
    ms, dash, seq = event_id.partition("-")
    if not dash or not ms.isdigit() or not seq.isdigit():
        raise InvalidInput(f"not an event id (<ms>-<seq>): {event_id!r}")
    return int(ms), int(seq)


def segment_name(seq: int) -> str:
    """The segment file of ``seq``: a function of seq alone, so that an append
    retried after a crash overwrites the orphan of the one that died."""
    return f"{seq:012d}.jsonl.gz"


def index_name(seq: int) -> str:
    """The job-index sidecar of segment ``seq``."""
    return f"{seq:012d}.jobs"


def seq_of(name: str) -> int | None:
    """The seq a segment or sidecar file name carries; None for other names."""
    stem, dot, _ = name.partition(".")
    return int(stem) if dot and len(stem) == 12 and stem.isdigit() else None


@dataclass(frozen=True, slots=True)
class ArchivedLine:
    """One event handed to the archive."""

    event_id: str  # the log entry id, "<ms>-<seq>"
    job_id: str
    line: bytes  # the event as `agentq replay` prints it: JSON, no newline
    # Set by a writer that made the line from the event whose ids these are (the
    # archiver, with ``RawEvent.line``: orjson escapes every control character,
    # so the line holds no newline): such a line needs no check (``check_lines``
    # parses every other one again).
    made: bool = False


@dataclass(frozen=True, slots=True)
class Encoded:
    """A segment ready to be written."""

    data: bytes
    sha256: str
    index: bytes  # the sidecar
    jobs: tuple[tuple[str, str], ...]  # the manifest's job-id ranges


def encode(lines: Sequence[ArchivedLine]) -> Encoded:
    """Compress ``lines`` into a segment."""
    data = gzip.compress(b"".join(line.line + b"\n" for line in lines), COMPRESSION_LEVEL,
                         mtime=0)
    jobs = sorted({line.job_id for line in lines})
    return Encoded(data, hashlib.sha256(data).hexdigest(),
                   "".join(f"{job}\n" for job in jobs).encode(), job_ranges(jobs))


def decode_text(data: bytes) -> bytes:
    """A segment file's text (raises ``ValueError``, ``OSError`` or ``EOFError``
    when it is not a gzip)."""
    return gzip.decompress(data)


def lines_of(text: bytes) -> list[bytes]:
    """A segment's lines."""
    return text.split(b"\n")[:-1] if text.endswith(b"\n") else text.split(b"\n")


def decode_lines(data: bytes) -> list[bytes]:
    """A segment file's lines (raises as ``decode_text``)."""
    return lines_of(decode_text(data))


def lines_holding(text: bytes, needle: bytes) -> list[bytes]:
    """The lines of a segment's text that hold ``needle``, in order: found by
    searching the text, not by splitting it (a job's few lines among 10,000)."""
    found = []
    at = text.find(needle)
    while at >= 0:
        start = text.rfind(b"\n", 0, at) + 1
        end = text.find(b"\n", at)
        if end < 0:
            end = len(text)
        found.append(text[start:end])
        at = text.find(needle, end)
    return found


def parse(line: bytes) -> dict[str, Any]:
    """One line as the event object it is; ``ValueError`` when it is not one."""
    event = orjson.loads(line)
    if (not isinstance(event, dict) or not isinstance(event.get(EVENT_ID_KEY), str)
            or not isinstance(event.get(JOB_ID_KEY), str)):
        raise ValueError(f"not an event object with {EVENT_ID_KEY} and {JOB_ID_KEY}")
    return event


def read_index(data: bytes) -> list[str]:
    """A sidecar's job ids, sorted."""
    return data.decode().split()


def index_holds(index: list[str], job_id: str) -> bool:
    at = bisect_left(index, job_id)
    return at < len(index) and index[at] == job_id


def job_ranges(jobs: Sequence[str], most: int = MOST_RANGES) -> tuple[tuple[str, str], ...]:
    """Sorted job ids as at most ``most`` (first, last) ranges covering all of them.

    Job ids sort by creation time. A segment holds mostly jobs of its own minutes
    plus a few stragglers (a job running for days, an old job retried): one range
    from the oldest straggler to the newest job would make the segment a candidate
    for every job in between. Cutting at the widest gaps in creation time leaves
    the stragglers as ranges of their own (often one id), so a job's candidates
    are the segments that hold it plus the few whose dense range spans its time.
    """
    if not jobs:
        return ()
    # Jobs made in the same millisecond share the id's first 12 characters.
    made = {prefix: job_id_time_ms(prefix) for prefix in {job[:12] for job in jobs}}
    times = [made[job[:12]] for job in jobs]
    gaps = [(b - a if a is not None and b is not None else 0, at)
            for at, (a, b) in enumerate(itertools.pairwise(times))]
    cuts = sorted(at for gap, at in heapq.nlargest(most - 1, gaps) if gap > 0)
    ranges: list[tuple[str, str]] = []
    start = 0
    for at in cuts:
        ranges.append((jobs[start], jobs[at]))
        start = at + 1
    ranges.append((jobs[start], jobs[-1]))
    return tuple(ranges)


def check_lines(lines: Sequence[ArchivedLine]) -> Iterator[str]:
    """What is wrong with lines about to be archived (each must be one JSON event
    object whose ids are the ones given with it): the readers find events by
    those ids."""
    for archived in lines:
        if archived.made:
            continue
        line, event_id, job_id = archived.line, archived.event_id, archived.job_id
        if b"\n" in line:
            yield f"event {event_id}: its line holds a newline"
            continue
        try:
            event = parse(line)
        except ValueError as exc:
            yield f"event {event_id}: its line is not an event's JSON ({exc})"
            continue
        if event[EVENT_ID_KEY] != event_id or event[JOB_ID_KEY] != job_id:
            yield (f"event {event_id}: its line says {EVENT_ID_KEY} {event[EVENT_ID_KEY]!r}, "
                   f"{JOB_ID_KEY} {event[JOB_ID_KEY]!r}, not {event_id!r}, {job_id!r}")
