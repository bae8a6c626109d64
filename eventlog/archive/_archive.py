"""The archive of a deployment: per partition, segments of events and a manifest.

Layout under the root ``<url>/<key_prefix>/``::

    <agent>/manifest.json            the segments in order, with the hash chain
    <agent>/000000000001.jsonl.gz    segment 1: JSON Lines, gzip
    <agent>/000000000001.jobs        its job ids, sorted, one a line
    <agent>/000000000002.jsonl.gz    ...

One writer per partition (the process serving it, by ownership); any number of
readers, which see only what the manifest lists.
"""

from __future__ import annotations

import asyncio
import functools
import zlib
from collections.abc import AsyncIterator, Callable, Hashable, Mapping, Sequence
from typing import Any

from agentq.eventlog.archive._errors import ArchiveError
from agentq.eventlog.archive._manifest import MANIFEST, Manifest, Segment
from agentq.eventlog.archive._segments import (
    EVENT_ID_KEY,
    JOB_ID_KEY,
    ArchivedLine,
    Encoded,
    EventKey,
    check_lines,
    decode_text,
    encode,
    event_key,
    index_holds,
    index_name,
    lines_holding,
    lines_of,
    parse,
    read_index,
    segment_name,
)
from agentq.eventlog.archive._store import Store, open_store
from agentq.eventlog.archive._verify import verify_partition
from agentq.schemas.errors import InvalidInput

# How many segments' texts (and job indexes) an Archive keeps once read.
RECENT_SEGMENTS = 8


def open_archive(url: str, key_prefix: str) -> Archive:
    """The archive at ``<url>/<key_prefix>/``. ``url``: ``file:///abs/path``, a
    plain path, or ``s3://bucket/prefix`` (endpoint and credentials from the AWS
    environment variables: AWS_ENDPOINT_URL or AWS_ENDPOINT_URL_S3,
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION or
    AWS_DEFAULT_REGION, AWS_PROFILE). Nothing is contacted yet: a storage that
    cannot be reached fails the first call, with ``ArchiveError``."""
    if not url.strip():
        raise ArchiveError("archive: no URL given", url)
    prefix = key_prefix.strip("/")
    return Archive(open_store(f"{url.rstrip('/')}/{prefix}" if prefix else url))


def _on_loop(progress: Callable[[str, int, int], None], agent: str
             ) -> Callable[[int, int], None]:
    """``progress`` for ``agent``, callable from a worker thread: it runs on this
    event loop (in order, before the thread's result is seen there)."""
    loop = asyncio.get_running_loop()

    def checked(done: int, total: int) -> None:
        loop.call_soon_threadsafe(progress, agent, done, total)

    return checked


class Archive:
    """The archive's reads and its one write (``append``). Every method runs the
    storage's blocking calls in a thread."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.url = store.url
        self._locks: dict[str, asyncio.Lock] = {}
        # The manifest last read per partition, with the stamp it had (an ETag, or
        # inode/size/time): a read then costs one HEAD or stat, not a manifest.
        self._manifests: dict[str, tuple[Hashable, Manifest]] = {}
        # The texts and job indexes of the last segments read, by their manifest
        # entry (its SHA-256 among it: what they hold never changes). A job's
        # history reads its segments twice (its record, then its events), and jobs
        # read one after another often share a segment. Safe across the reading
        # threads; a segment of 10,000 events is ~2 MB of text.
        self._text_of = functools.lru_cache(maxsize=RECENT_SEGMENTS)(self._read_text)
        self._index_of = functools.lru_cache(maxsize=RECENT_SEGMENTS)(self._read_index)

    async def partitions(self) -> list[str]:
        """The agents that have a manifest, sorted."""
        folders = [name for name in await asyncio.to_thread(self.store.folders)
                   if not name.startswith(".")]
        stamps = await asyncio.gather(*(asyncio.to_thread(self.store.stamp, f"{name}/{MANIFEST}")
                                        for name in folders))
        return [name for name, stamp in zip(folders, stamps, strict=True) if stamp is not None]

    async def segments(self, agent: str) -> list[Segment]:
        """The partition's segments in manifest order; [] when none."""
        return list((await self._manifest(agent)).segments)

    async def last(self, agent: str) -> Segment | None:
        """The manifest's last segment (where the partition's archive ends), or None."""
        return (await self._manifest(agent)).last

    async def append(self, agent: str, lines: Sequence[ArchivedLine]) -> Segment:
        """Archive ``lines`` (in log order, all after ``last().last``) as the
        partition's next segment, and return its entry.

        The segment and its job index are made durable first, then the manifest
        that lists them: a process killed at any point leaves the old manifest (the
        files written are orphans that readers never see and the next append
        overwrites) or the new one. Raises ``ArchiveError`` with the manifest
        unchanged when a write fails, and when ``lines`` are empty, out of order,
        not after the archive's last event (they would be read twice), or not the
        events their ids say."""
        _check_agent(agent, self.url)
        if not lines:
            raise ArchiveError(f"archive {self.url}: {agent}: nothing to append", self.url)
        async with self._locks.setdefault(agent, asyncio.Lock()):
            manifest = await self._manifest(agent)
            tail = manifest.last
            self._check_order(agent, lines, tail)
            encoded = await asyncio.to_thread(self._encoded, agent, lines)
            seq = tail.seq + 1 if tail else 1
            segment = Segment(seq, segment_name(seq), lines[0].event_id, lines[-1].event_id,
                              len(lines), encoded.sha256, tail.sha256 if tail else "",
                              encoded.jobs, index_name(seq))
            updated = manifest.extended(segment)
            try:
                await asyncio.to_thread(self.store.put, f"{agent}/{segment.name}", encoded.data)
                await asyncio.to_thread(self.store.put, f"{agent}/{segment.job_index}",
                                        encoded.index)
                stamp = await asyncio.to_thread(self.store.put, f"{agent}/{MANIFEST}",
                                                updated.to_json())
            except BaseException:
                # The manifest may or may not have been replaced (a PUT whose answer
                # was lost): read it again next time.
                self._manifests.pop(agent, None)
                raise
            if stamp is not None:
                self._manifests[agent] = (stamp, updated)
            return segment

    async def read(self, agent: str, after: str | None = None, until: str | None = None
                   ) -> AsyncIterator[dict[str, Any]]:
        """The partition's archived events (JSON objects as ``replay`` prints them)
        after event id ``after`` (exclusive) up to ``until`` (inclusive), in log
        order. Reads a segment at a time, and only the segments whose span meets
        the range (found in the manifest)."""
        after_key = event_key(after) if after is not None else None
        until_key = event_key(until) if until is not None else None
        manifest = await self._manifest(agent)
        for segment in manifest.between(after_key, until_key):
            events = await asyncio.to_thread(self._events, agent, segment, after_key, until_key)
            for event in events:
                yield event

    async def job_events(self, agent: str, job_id: str) -> list[dict[str, Any]]:
        """One job's archived events in log order; [] when none. Reads the manifest,
        the job index of each segment whose job ranges cover ``job_id`` (unless the
        range is that one id), and only the segments that hold the job."""
        manifest = await self._manifest(agent)
        candidates = [(segment, segment.may_hold(job_id)) for segment in manifest.segments]
        maybe = [segment for segment, holds in candidates if holds is not False]
        held = await asyncio.gather(*(
            asyncio.to_thread(self._holds, agent, segment, job_id) for segment in maybe))
        found = await asyncio.gather(*(
            asyncio.to_thread(self._job_events_in, agent, segment, job_id)
            for segment, holds in zip(maybe, held, strict=True) if holds))
        return [event for events in found for event in events]

    async def verify(self, agent: str | None = None, heads: Mapping[str, str] | None = None,
                     progress: Callable[[str, int, int], None] | None = None) -> list[str]:
        """The problems found, each naming the partition and the segment or file; []
        when intact. Every listed segment is read and hashed, its lines checked
        against its entry, the chain followed, and the folder searched for files
        no entry lists. ``heads``: the last sha256 each partition is expected to
        end at (kept outside the archive), so that segments and manifest edited
        together are caught too. ``agent``: that partition only, else every
        partition folder and every partition named in ``heads``. ``progress`` is
        told, on the event loop, after each segment: the partition, how many of
        its segments are checked, and of how many."""
        if agent is not None:
            _check_agent(agent, self.url)
            agents = [agent]
        else:
            folders = await asyncio.to_thread(self.store.folders)
            agents = sorted({name for name in folders if not name.startswith(".")}
                            | set(heads or ()))
        problems: list[str] = []
        for name in agents:
            head = heads.get(name) if heads is not None else None
            checked = None if progress is None else _on_loop(progress, name)
            problems.extend(await asyncio.to_thread(verify_partition, self.store, name, head,
                                                    checked))
        return problems

    # -- internals ----------------------------------------------------------

    async def _manifest(self, agent: str) -> Manifest:
        _check_agent(agent, self.url)
        path = f"{agent}/{MANIFEST}"
        stamp = await asyncio.to_thread(self.store.stamp, path)
        cached = self._manifests.get(agent)
        if stamp is None:
            self._manifests.pop(agent, None)
            return Manifest(agent)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        raw = await asyncio.to_thread(self.store.get, path)
        if raw is None:  # removed since the stamp
            return Manifest(agent)
        try:
            manifest = await asyncio.to_thread(Manifest.of_json, raw)
        except ValueError as exc:
            raise ArchiveError(f"archive {self.url}: {path} cannot be read: {exc}",
                               self.url) from exc
        self._manifests[agent] = (stamp, manifest)
        return manifest

    def _check_order(self, agent: str, lines: Sequence[ArchivedLine], tail: Segment | None
                     ) -> None:
        try:
            keys = [event_key(line.event_id) for line in lines]
        except InvalidInput as exc:
            raise ArchiveError(f"archive {self.url}: {agent}: append refused: {exc.message}",
                               self.url) from exc
        if tail is not None and keys[0] <= event_key(tail.last):
            raise ArchiveError(
                f"archive {self.url}: {agent}: append refused: event {lines[0].event_id} is "
                f"not after the archive's last, {tail.last} (segment {tail.seq}): it would be "
                "read twice", self.url)
        for at in range(1, len(keys)):
            if keys[at] <= keys[at - 1]:
                raise ArchiveError(
                    f"archive {self.url}: {agent}: append refused: event "
                    f"{lines[at].event_id} follows {lines[at - 1].event_id} (not in log order)",
                    self.url)

    def _encoded(self, agent: str, lines: Sequence[ArchivedLine]) -> Encoded:
        problems = list(check_lines(lines))
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ArchiveError(f"archive {self.url}: {agent}: append refused: {problems[0]}{more}",
                               self.url)
        return encode(lines)

    def _lines(self, agent: str, segment: Segment) -> list[bytes]:
        """A listed segment's lines; ``ArchiveError`` when it is gone or unreadable
        (``audit verify --archive`` tells what happened to it)."""
        return lines_of(self._text_of(agent, segment))

    def _read_text(self, agent: str, segment: Segment) -> bytes:
        data = self.store.get(f"{agent}/{segment.name}")
        if data is None:
            raise ArchiveError(f"archive {self.url}: {agent}: segment {segment.seq} "
                               f"({segment.name}) is listed but missing", self.url)
        try:
            return decode_text(data)
        except (OSError, EOFError, ValueError, zlib.error) as exc:
            raise ArchiveError(f"archive {self.url}: {agent}: segment {segment.seq} "
                               f"({segment.name}) cannot be read: {exc}", self.url) from exc

    def _events(self, agent: str, segment: Segment, after: EventKey | None,
                until: EventKey | None) -> list[dict[str, Any]]:
        events = [self._parsed(agent, segment, line) for line in self._lines(agent, segment)]
        # Only the segments at either end of the range need their ids compared.
        if after is not None and event_key(segment.first) <= after:
            events = [event for event in events if event_key(event[EVENT_ID_KEY]) > after]
        if until is not None and event_key(segment.last) > until:
            events = [event for event in events if event_key(event[EVENT_ID_KEY]) <= until]
        return events

    def _holds(self, agent: str, segment: Segment, job_id: str) -> bool:
        if segment.may_hold(job_id):
            return True
        index = self._index_of(agent, segment)
        # No sidecar (removed: verify names it): the segment itself will tell.
        return True if index is None else index_holds(index, job_id)

    def _read_index(self, agent: str, segment: Segment) -> list[str] | None:
        data = self.store.get(f"{agent}/{segment.job_index}") if segment.job_index else None
        return None if data is None else read_index(data)

    def _job_events_in(self, agent: str, segment: Segment, job_id: str
                       ) -> list[dict[str, Any]]:
        events = (self._parsed(agent, segment, line)
                  for line in lines_holding(self._text_of(agent, segment), job_id.encode()))
        return [event for event in events if event[JOB_ID_KEY] == job_id]

    def _parsed(self, agent: str, segment: Segment, line: bytes) -> dict[str, Any]:
        try:
            return parse(line)
        except ValueError as exc:
            raise ArchiveError(f"archive {self.url}: {agent}: segment {segment.seq} "
                               f"({segment.name}) holds a line that is no event: {exc}",
                               self.url) from exc


def _check_agent(agent: str, url: str) -> None:
    """A partition's name must be one folder name of the archive."""
    if not agent or "/" in agent or "\\" in agent or agent.startswith("."):
        raise ArchiveError(f"archive {url}: {agent!r} is not a partition name", url)
