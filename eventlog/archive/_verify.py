"""Tamper evidence: a partition's files checked against its manifest and chain.

How each kind of change shows:

- edited: a listed file whose SHA-256 differs from its entry's and from every
  other entry's; or whose digest matches but whose lines do not (the manifest's
  span, count or job index was edited instead);
- removed: a listed file that is missing; or a gap in the manifest's seqs, a
  chain link (``prev``) that does not match the entry before (an entry taken
  out of the manifest);
- reordered: a listed file whose SHA-256 is another entry's (files swapped or
  moved); or entries whose seqs, chain links or event ids are out of order;
- added: a file in the partition's folder that no entry lists; an entry whose
  ``prev`` does not match; or, with ``head``, a chain that goes past the head
  the archiving pass recorded.

Editing files and the manifest together, chain recomputed, is caught only
against ``head``: the last SHA-256 kept outside the archive (in Redis).
"""

from __future__ import annotations

import hashlib
import itertools
import zlib
from collections.abc import Callable

from agentq.eventlog.archive._manifest import MANIFEST, Manifest, Segment
from agentq.eventlog.archive._segments import (
    EVENT_ID_KEY,
    JOB_ID_KEY,
    decode_lines,
    event_key,
    parse,
    read_index,
    seq_of,
)
from agentq.eventlog.archive._store import Store, is_temp
from agentq.schemas.errors import InvalidInput


def _short(sha: str) -> str:
    return sha[:12] or '""'


def verify_partition(store: Store, agent: str, head: str | None,
                     checked: Callable[[int, int], None] | None = None) -> list[str]:
    """The problems of one partition, each naming it and the segment or file
    concerned; [] when intact. Blocking: reads every segment, one at a time;
    ``checked`` is told after each how many of how many are checked."""
    files = {name for name in store.names(agent) if not is_temp(name)}
    raw = store.get(f"{agent}/{MANIFEST}")
    if raw is None:
        problems = []
        if files:
            problems.append(f"{agent}: {len(files)} file(s) ({', '.join(sorted(files)[:3])}"
                            f"{', …' if len(files) > 3 else ''}) but no {MANIFEST} "
                            "(the manifest removed, or files added)")
        if head:
            problems.append(f"{agent}: no {MANIFEST}, but the archive's head is recorded as "
                            f"{_short(head)}: the manifest was removed")
        return problems
    try:
        manifest = Manifest.of_json(raw)
    except ValueError as exc:
        return [f"{agent}: {MANIFEST} cannot be read ({exc}): edited"]
    problems = []
    if manifest.agent != agent:
        problems.append(f"{agent}: {MANIFEST} is partition {manifest.agent!r}'s (moved here)")
    problems.extend(_chain(agent, manifest.segments))
    by_sha = {segment.sha256: segment for segment in manifest.segments}
    for done, segment in enumerate(manifest.segments, 1):
        problems.extend(_segment(store, agent, segment, files, by_sha))
        if checked is not None:
            checked(done, len(manifest.segments))
    listed = {MANIFEST} | {segment.name for segment in manifest.segments} | {
        segment.job_index for segment in manifest.segments if segment.job_index}
    pending = manifest.last.seq + 1 if manifest.last else 1
    for name in sorted(files - listed):
        why = ("added, or left by an append that did not finish: the next append replaces it"
               if seq_of(name) == pending else "added")
        problems.append(f"{agent}: {name} is in the folder but not in the manifest ({why})")
    if head is not None:
        problems.extend(_head(agent, manifest.segments, head))
    return problems


def _label(agent: str, segment: Segment) -> str:
    return f"{agent}: segment {segment.seq} ({segment.name})"


def _chain(agent: str, segments: tuple[Segment, ...]) -> list[str]:
    """The manifest's own order: seqs 1, 2, …; each prev the sha256 before it;
    event ids increasing from one segment to the next."""
    problems: list[str] = []
    listed = {segment.seq for segment in segments}
    before: Segment | None = None
    highest = 0
    for segment in segments:
        label = _label(agent, segment)
        expected = highest + 1
        if segment.seq > expected:
            missing = [seq for seq in range(expected, segment.seq) if seq not in listed]
            if missing:
                gap = ", ".join(map(str, missing[:5])) + (", …" if len(missing) > 5 else "")
                problems.append(f"{label}: segment(s) {gap} before it not in the manifest "
                                "(removed)")
            else:
                problems.append(f"{label}: listed before segment {expected} (reordered)")
        elif segment.seq < expected:
            problems.append(f"{label}: listed after segment {highest} (reordered, or listed "
                            "twice)")
        highest = max(highest, segment.seq)
        prev = before.sha256 if before else ""
        if segment.prev != prev:
            where = f"segment {before.seq}'s" if before else "the start of the chain"
            problems.append(f"{label}: its prev {_short(segment.prev)} is not {where} sha256 "
                            f"{_short(prev)}: the chain breaks here (a segment removed, added "
                            "or reordered before it)")
        if before and event_key(segment.first) <= event_key(before.last):
            problems.append(f"{label}: its first event {segment.first} is not after segment "
                            f"{before.seq}'s last {before.last} (reordered)")
        before = segment
    return problems


def _segment(store: Store, agent: str, segment: Segment, files: set[str],
             by_sha: dict[str, Segment]) -> list[str]:
    label = _label(agent, segment)
    if segment.name not in files:
        return [f"{label}: listed in the manifest but missing (removed)"]
    data = store.get(f"{agent}/{segment.name}")
    if data is None:
        return [f"{label}: listed in the manifest but missing (removed)"]
    sha = hashlib.sha256(data).hexdigest()
    if sha != segment.sha256:
        other = by_sha.get(sha)
        if other is not None:
            return [f"{label}: the file holds segment {other.seq}'s content (reordered: "
                    "segments swapped or moved)"]
        return [f"{label}: its sha256 {_short(sha)} is not the manifest's "
                f"{_short(segment.sha256)} (edited)"]
    return _content(store, agent, segment, data)


def _content(store: Store, agent: str, segment: Segment, data: bytes) -> list[str]:
    """A file whose digest matches: its lines against the entry's span, count and
    job index (a mismatch here means the manifest or the sidecar was edited)."""
    label = _label(agent, segment)
    try:
        lines = decode_lines(data)
        events = [parse(line) for line in lines]
        keys = [event_key(event[EVENT_ID_KEY]) for event in events]
    except (ValueError, OSError, EOFError, zlib.error, InvalidInput) as exc:
        return [f"{label}: its lines cannot be read ({exc}): edited before it was recorded"]
    problems = []
    if any(b <= a for a, b in itertools.pairwise(keys)):
        problems.append(f"{label}: its events are not in log order (edited)")
    if (len(events) != segment.count or not events
            or events[0][EVENT_ID_KEY] != segment.first
            or events[-1][EVENT_ID_KEY] != segment.last):
        span = (f"{events[0][EVENT_ID_KEY]}..{events[-1][EVENT_ID_KEY]}, {len(events)} events"
                if events else "no events")
        problems.append(f"{label}: the manifest says {segment.first}..{segment.last}, "
                        f"{segment.count} events; the file holds {span} (manifest edited)")
    jobs = sorted({event[JOB_ID_KEY] for event in events})
    uncovered = [job for job in jobs if segment.may_hold(job) is False]
    stray = {end for pair in segment.jobs for end in pair} - set(jobs)
    if uncovered or stray:
        problems.append(f"{label}: the manifest's job ranges do not match the file's jobs "
                        f"({len(uncovered)} not covered, {len(stray)} not in it) (manifest "
                        "edited)")
    index = store.get(f"{agent}/{segment.job_index}") if segment.job_index else None
    if index is None:
        problems.append(f"{label}: its job index {segment.job_index or '(none)'} is missing "
                        "(removed)")
    else:
        try:
            indexed = read_index(index)
        except UnicodeDecodeError:
            indexed = []
        if indexed != jobs:
            problems.append(f"{label}: its job index {segment.job_index} does not list the "
                            "file's jobs (edited)")
    return problems


def _head(agent: str, segments: tuple[Segment, ...], head: str) -> list[str]:
    """The chain against the head recorded outside the archive."""
    last = segments[-1] if segments else None
    if (last.sha256 if last else "") == head:
        return []
    if not last:
        return [f"{agent}: the manifest lists no segment, but the archive's head is recorded "
                f"as {_short(head)} (segments removed with the manifest rewritten)"]
    at = next((segment for segment in segments if segment.sha256 == head), None)
    if at is not None or not head:
        start = at.seq + 1 if at is not None else 1
        after = f"{start}" if start == last.seq else f"{start}-{last.seq}"
        recorded = f"segment {at.seq}, {_short(head)}" if at is not None else "none"
        return [f"{_label(agent, last)}: segment(s) {after} come after the recorded head "
                f"({recorded}): added, or an archive pass stopped before recording its head"]
    return [f"{_label(agent, last)}: the chain ends at {_short(last.sha256)}, not at the "
            f"recorded head {_short(head)}: segments and the manifest were rewritten together "
            "(edited, removed or reordered)"]

