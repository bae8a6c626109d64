"""The archive's storage (eventlog/archive): segments, manifest and hash chain, the
job index, reading back and tamper evidence; each test on a temporary folder and
on a local S3 server (moto, a subprocess on loopback)."""

from __future__ import annotations

import gzip
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from agentq.eventlog.archive import Archive, ArchivedLine, ArchiveError, Segment, open_archive
from agentq.eventlog.archive._manifest import MANIFEST, Manifest
from agentq.eventlog.archive._segments import encode, lines_holding, lines_of

AGENT = "researcher"
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
T0 = 1_764_547_200_000  # ms: job ids and event ids are made around here


@pytest.fixture(params=["file", "s3"])
def archive_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty archive's URL: a temporary folder, or a new bucket on the S3 server."""
    if request.param == "file":
        return f"file://{tmp_path}/archive"
    return str(request.getfixturevalue("s3_bucket"))


@pytest.fixture
def archive(archive_url: str) -> Archive:
    return open_archive(archive_url, "agentq")


class Opened:
    """Counts the files an archive reads (its store's ``get``), by name. With
    ``cached`` False, the archive keeps nothing it read (each read opens its
    files), so that what a read opens is what it needs."""

    def __init__(self, archive: Archive, monkeypatch: pytest.MonkeyPatch,
                 cached: bool = False) -> None:
        self.names: Counter[str] = Counter()
        get = archive.store.get
        if not cached:
            monkeypatch.setattr(archive, "_text_of", archive._read_text)
            monkeypatch.setattr(archive, "_index_of", archive._read_index)

        def counting(path: str) -> bytes | None:
            self.names[path.rsplit("/", 1)[-1]] += 1
            return get(path)

        monkeypatch.setattr(archive.store, "get", counting)

    def segments(self) -> set[int]:
        return {int(name[:12]) for name in self.names if name.endswith(".jsonl.gz")}

    def indexes(self) -> set[int]:
        return {int(name[:12]) for name in self.names if name.endswith(".jobs")}

    def clear(self) -> None:
        self.names.clear()


def job_id(ms: int, n: int = 0, agent: str = AGENT) -> str:
    """A job id made at ``ms`` (its ULID's time), ``n`` telling apart ids of one ms."""
    time_part = "".join(_CROCKFORD[(ms >> (5 * i)) & 31] for i in reversed(range(10)))
    random_part = "".join(_CROCKFORD[(n >> (5 * i)) & 31] for i in reversed(range(16)))
    return f"j_{time_part}{random_part}.{agent}"


def event(event_id: str, job: str, n: int = 0) -> ArchivedLine:
    """An event as ``replay`` prints it."""
    body = {"eventId": event_id, "type": "JobProgress", "jobId": job, "agent": AGENT,
            "at": "2025-12-01T00:00:00.000000Z", "actor": AGENT, "v": 1,
            "data": {"n": n, "note": "é ✓"}}
    return ArchivedLine(event_id, job, orjson.dumps(body))


def batch(ms: int, count: int, jobs: list[str]) -> list[ArchivedLine]:
    """``count`` events at ``ms``-0, ``ms``-1, … spread over ``jobs`` in turn."""
    return [event(f"{ms}-{seq}", jobs[seq % len(jobs)], seq) for seq in range(count)]


async def fill(archive: Archive, segments: int = 4, per: int = 12) -> list[list[ArchivedLine]]:
    """``segments`` appends of ``per`` events each, ids crossing decimal widths
    (999 -> 1000 ms, seq 9 -> 10) so that a string comparison would go wrong."""
    batches = []
    for at in range(segments):
        ms = 998 + at
        jobs = [job_id(T0 + 1000 * at, n) for n in range(3)]
        lines = batch(ms, per, jobs)
        await archive.append(AGENT, lines)
        batches.append(lines)
    return batches


async def read_all(archive: Archive, after: str | None = None, until: str | None = None
                   ) -> list[dict[str, Any]]:
    return [e async for e in archive.read(AGENT, after=after, until=until)]


# -- writing and reading back --------------------------------------------------


async def test_append_and_read_back(archive: Archive) -> None:
    assert await archive.partitions() == []
    assert await archive.last(AGENT) is None
    batches = await fill(archive, segments=3)
    lines = [line for lines in batches for line in lines]

    segments = await archive.segments(AGENT)
    assert [s.seq for s in segments] == [1, 2, 3]
    assert [(s.first, s.last, s.count) for s in segments] == [
        ("998-0", "998-11", 12), ("999-0", "999-11", 12), ("1000-0", "1000-11", 12)]
    assert [s.prev for s in segments] == ["", segments[0].sha256, segments[1].sha256]
    assert await archive.last(AGENT) == segments[-1]
    assert await archive.partitions() == [AGENT]

    # The files are gzip'ed JSON Lines, each line the bytes given, readable without
    # agentq; and a second handle on the same URL reads the same.
    for segment, given in zip(segments, batches, strict=True):
        raw = archive.store.get(f"{AGENT}/{segment.name}")
        assert raw is not None
        assert gzip.decompress(raw) == b"".join(line.line + b"\n" for line in given)
    again = open_archive(archive.url, "")
    assert await again.segments(AGENT) == segments
    read = await read_all(again)
    assert [orjson.dumps(e) for e in read] == [line.line for line in lines]
    assert read[0]["data"]["note"] == "é ✓"


async def test_read_range_opens_only_its_segments(archive: Archive,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    batches = await fill(archive, segments=4)
    ids = [line.event_id for lines in batches for line in lines]
    opened = Opened(archive, monkeypatch)

    # after 999-9 (exclusive) up to 1000-10 (inclusive): segments 2 and 3 only.
    read = await read_all(archive, after="999-9", until="1000-10")
    assert [e["eventId"] for e in read] == ids[ids.index("999-9") + 1: ids.index("1000-10") + 1]
    assert opened.segments() == {2, 3}

    opened.clear()
    assert [e["eventId"] for e in await read_all(archive, after="999-11")] == ids[24:]
    assert opened.segments() == {3, 4}
    opened.clear()
    assert [e["eventId"] for e in await read_all(archive, until="998-3")] == ids[:4]
    assert opened.segments() == {1}
    opened.clear()
    assert await read_all(archive, after="1001-11") == []
    assert await read_all(archive, until="997-99") == []
    assert opened.segments() == set()


async def test_a_segment_read_again_soon_is_not_opened_again(
        archive: Archive, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job's history reads its segments twice (its record, then its events):
    the second read, and a neighbour's, come from what was just read."""
    batches = await fill(archive, segments=3)
    job = batches[1][0].job_id
    opened = Opened(archive, monkeypatch, cached=True)
    first = await archive.job_events(AGENT, job)
    assert first and opened.segments() == {2}
    opened.clear()
    assert await archive.job_events(AGENT, job) == first
    assert await archive.job_events(AGENT, batches[1][-1].job_id)
    assert opened.segments() == set() and opened.indexes() == set()
    # A handle of its own reads the files (what one holds is its own).
    again = open_archive(archive.url, "")
    assert await again.job_events(AGENT, job) == first


async def test_job_events_opens_only_the_segments_holding_the_job(
        archive: Archive, monkeypatch: pytest.MonkeyPatch) -> None:
    # A long job (made first) has events in segments 1, 3 and 5; each segment also
    # holds jobs made around its own time.
    long_job = job_id(T0)
    segment_of: dict[int, list[str]] = {}
    for seq in range(1, 7):
        jobs = [job_id(T0 + 60_000 * seq, n) for n in (0, 2, 4)]
        segment_of[seq] = jobs
        lines = batch(2000 + seq, 9, jobs)
        if seq in (1, 3, 5):
            lines[4] = event(f"{2000 + seq}-4", long_job, 4)
        await archive.append(AGENT, lines)
    # A job made among segment 3's but with no event anywhere: only an index says so.
    absent = job_id(T0 + 60_000 * 3, 1)
    opened = Opened(archive, monkeypatch)

    events = await archive.job_events(AGENT, long_job)
    assert [e["eventId"] for e in events] == ["2001-4", "2003-4", "2005-4"]
    assert all(e["jobId"] == long_job for e in events)
    assert opened.segments() == {1, 3, 5}
    # Its own range in each of those segments (the widest gap cut it off): no
    # index needed to know.
    assert opened.indexes() == set()

    opened.clear()
    middle = segment_of[4][1]
    assert [e["eventId"] for e in await archive.job_events(AGENT, middle)] == [
        "2004-1", "2004-4", "2004-7"]
    assert opened.segments() == {4}

    opened.clear()
    assert absent not in segment_of[3]
    assert await archive.job_events(AGENT, absent) == []
    assert opened.segments() == set()
    assert opened.indexes() == {3}
    assert await archive.job_events(AGENT, job_id(T0 + 10**9)) == []
    assert await archive.job_events("nobody", long_job) == []


# -- a crash between segment and manifest --------------------------------------


async def test_failed_manifest_write_leaves_the_archive_as_it_was(
        archive: Archive, monkeypatch: pytest.MonkeyPatch) -> None:
    await fill(archive, segments=2)
    before = await archive.segments(AGENT)
    write = archive.store._write

    def dies_at_manifest(full: str, data: bytes) -> Any:
        if full.endswith(MANIFEST):
            raise OSError("disk gone")  # the process "dies" here
        return write(full, data)

    # Below the store's error handling: what a failing disk or PUT raises.
    monkeypatch.setattr(archive.store, "_write", dies_at_manifest)
    doomed = batch(1500, 5, [job_id(T0 + 5000)])
    with pytest.raises(ArchiveError) as caught:
        await archive.append(AGENT, doomed)
    assert archive.url in caught.value.message
    assert f"writing {AGENT}/{MANIFEST} failed" in caught.value.message
    monkeypatch.setattr(archive.store, "_write", write)

    # The orphan (segment 3 and its index) is written, but no reader sees it:
    # not this handle, not a new one.
    fresh = open_archive(archive.url, "")
    assert "000000000003.jsonl.gz" in archive.store.names(AGENT)
    for handle in (archive, fresh):
        assert await handle.segments(AGENT) == before
        assert [e["eventId"] for e in await read_all(handle)][-1] == before[-1].last
        assert await handle.job_events(AGENT, job_id(T0 + 5000)) == []
    problems = await fresh.verify(AGENT)
    assert problems == [f"{AGENT}: 000000000003.jobs is in the folder but not in the manifest "
                        "(added, or left by an append that did not finish: the next append "
                        "replaces it)",
                        f"{AGENT}: 000000000003.jsonl.gz is in the folder but not in the "
                        "manifest (added, or left by an append that did not finish: the next "
                        "append replaces it)"]

    # The retry (here with other lines) takes seq 3 over; all is clean again.
    retried = await fresh.append(AGENT, batch(1500, 3, [job_id(T0 + 6000)]))
    assert retried.seq == 3
    assert retried.prev == before[-1].sha256
    assert [e["eventId"] for e in await read_all(archive, after=before[-1].last)] == [
        "1500-0", "1500-1", "1500-2"]
    assert await archive.verify() == []


async def test_append_refuses_what_would_be_read_twice(archive: Archive) -> None:
    await fill(archive, segments=2)
    last = await archive.last(AGENT)
    assert last is not None and last.last == "999-11"
    jobs = [job_id(T0)]
    for lines in (batch(999, 12, jobs)[11:],  # at last().last
                  batch(999, 3, jobs),  # before it
                  [event("999-12", jobs[0]), event("999-12", jobs[0])],  # a duplicate inside
                  [event("1000-1", jobs[0]), event("1000-0", jobs[0])],  # out of order
                  [event("1000-0", jobs[0]), event("not-an-id", jobs[0])],
                  []):
        with pytest.raises(ArchiveError, match=r"nothing to append|append refused"):
            await archive.append(AGENT, lines)
    # A line whose JSON is not the event its ids say.
    wrong = ArchivedLine("1000-0", jobs[0], orjson.dumps({"eventId": "1000-1", "jobId": jobs[0]}))
    with pytest.raises(ArchiveError, match="eventId '1000-1'"):
        await archive.append(AGENT, [wrong])
    with pytest.raises(ArchiveError, match="not an event"):
        await archive.append(AGENT, [ArchivedLine("1000-0", jobs[0], b"[1, 2]")])
    assert await archive.last(AGENT) == last
    assert (await archive.append(AGENT, [event("1000-0", jobs[0])])).seq == 3


# -- tamper evidence -----------------------------------------------------------


def _rewrite_manifest(archive: Archive, segments: list[Segment]) -> None:
    archive.store.put(f"{AGENT}/{MANIFEST}", Manifest(AGENT, tuple(segments)).to_json())


def _file(archive: Archive, name: str) -> bytes:
    data = archive.store.get(f"{AGENT}/{name}")
    assert data is not None
    return data


async def test_verify_names_an_edited_segment(archive: Archive) -> None:
    await fill(archive)
    assert await archive.verify() == []
    segments = await archive.segments(AGENT)
    data = bytearray(_file(archive, segments[1].name))
    data[len(data) // 2] ^= 0x01
    archive.store.put(f"{AGENT}/{segments[1].name}", bytes(data))
    problems = await archive.verify()
    assert len(problems) == 1
    assert problems[0].startswith(f"{AGENT}: segment 2 (000000000002.jsonl.gz): its sha256 ")
    assert problems[0].endswith("(edited)")
    # A reader meeting it fails clearly (the damage is found by gzip's CRC or the
    # lines), naming the segment.
    with pytest.raises(ArchiveError, match=r"segment 2 \(000000000002\.jsonl\.gz\)"):
        await read_all(archive)


async def test_verify_names_a_removed_segment(archive: Archive) -> None:
    await fill(archive)
    segments = await archive.segments(AGENT)
    archive.store.delete(f"{AGENT}/{segments[2].name}")
    assert await archive.verify(AGENT) == [
        f"{AGENT}: segment 3 (000000000003.jsonl.gz): listed in the manifest but missing "
        "(removed)"]

    # Taken out of the manifest too: the gap and the broken link name it.
    archive.store.delete(f"{AGENT}/{segments[2].job_index}")
    _rewrite_manifest(archive, [segments[0], segments[1], segments[3]])
    problems = await archive.verify(AGENT)
    assert problems[0] == (f"{AGENT}: segment 4 (000000000004.jsonl.gz): segment(s) 3 before it "
                           "not in the manifest (removed)")
    assert problems[1].startswith(f"{AGENT}: segment 4 (000000000004.jsonl.gz): its prev ")
    assert "is not segment 2's sha256" in problems[1]
    assert len(problems) == 2


async def test_verify_names_two_swapped_segments(archive: Archive) -> None:
    await fill(archive)
    segments = await archive.segments(AGENT)
    second, third = (_file(archive, s.name) for s in segments[1:3])
    archive.store.put(f"{AGENT}/{segments[1].name}", third)
    archive.store.put(f"{AGENT}/{segments[2].name}", second)
    assert await archive.verify() == [
        f"{AGENT}: segment 2 (000000000002.jsonl.gz): the file holds segment 3's content "
        "(reordered: segments swapped or moved)",
        f"{AGENT}: segment 3 (000000000003.jsonl.gz): the file holds segment 2's content "
        "(reordered: segments swapped or moved)"]

    # Files put back, the manifest's entries swapped instead.
    archive.store.put(f"{AGENT}/{segments[1].name}", second)
    archive.store.put(f"{AGENT}/{segments[2].name}", third)
    _rewrite_manifest(archive, [segments[0], segments[2], segments[1], segments[3]])
    problems = await archive.verify()
    second, third, fourth = (f"{AGENT}: segment {seq} ({seq:012d}.jsonl.gz)" for seq in (2, 3, 4))
    assert f"{third}: listed before segment 2 (reordered)" in problems
    assert f"{second}: listed after segment 3 (reordered, or listed twice)" in problems
    assert (f"{second}: its first event 999-0 is not after segment 3's last 1000-11 "
            "(reordered)") in problems
    links = [p for p in problems if "the chain breaks here" in p]
    assert [p.split(": its prev")[0] for p in links] == [third, second, fourth]
    assert len(problems) == 6


async def test_verify_names_an_added_segment(archive: Archive) -> None:
    await fill(archive)
    segments = await archive.segments(AGENT)
    # A file no entry lists.
    archive.store.put(f"{AGENT}/000000000009.jsonl.gz", _file(archive, segments[0].name))
    assert await archive.verify() == [
        f"{AGENT}: 000000000009.jsonl.gz is in the folder but not in the manifest (added)"]
    archive.store.delete(f"{AGENT}/000000000009.jsonl.gz")

    # An entry added to the manifest whose prev does not link to the chain.
    forged = encode(batch(5000, 3, [job_id(T0 + 9000)]))
    archive.store.put(f"{AGENT}/000000000005.jsonl.gz", forged.data)
    archive.store.put(f"{AGENT}/000000000005.jobs", forged.index)
    entry = Segment(5, "000000000005.jsonl.gz", "5000-0", "5000-2", 3, forged.sha256,
                    segments[1].sha256, forged.jobs, "000000000005.jobs")
    _rewrite_manifest(archive, [*segments, entry])
    problems = await archive.verify()
    assert len(problems) == 1
    assert problems[0].startswith(f"{AGENT}: segment 5 (000000000005.jsonl.gz): its prev ")
    assert "the chain breaks here" in problems[0]


async def test_verify_catches_segment_and_manifest_edited_together_by_the_head(
        archive: Archive) -> None:
    await fill(archive)
    segments = await archive.segments(AGENT)
    head = segments[-1].sha256
    # Segment 4 replaced with other events and the manifest rewritten to match:
    # its chain is whole again.
    forged = encode(batch(1001, 12, [job_id(T0 + 3000)]))
    archive.store.put(f"{AGENT}/{segments[3].name}", forged.data)
    archive.store.put(f"{AGENT}/{segments[3].job_index}", forged.index)
    _rewrite_manifest(archive, [*segments[:3], Segment(
        4, segments[3].name, "1001-0", "1001-11", 12, forged.sha256, segments[2].sha256,
        forged.jobs, segments[3].job_index)])
    assert await archive.verify() == []
    problems = await archive.verify(heads={AGENT: head})
    assert problems == [
        f"{AGENT}: segment 4 (000000000004.jsonl.gz): the chain ends at {forged.sha256[:12]}, "
        f"not at the recorded head {head[:12]}: segments and the manifest were rewritten "
        "together (edited, removed or reordered)"]
    # A head recorded by an earlier pass, the manifest past it.
    assert await archive.verify(AGENT, heads={AGENT: segments[1].sha256}) == [
        f"{AGENT}: segment 4 (000000000004.jsonl.gz): segment(s) 3-4 come after the recorded "
        f"head (segment 2, {segments[1].sha256[:12]}): added, or an archive pass stopped "
        "before recording its head"]
    # No head recorded yet, segments in the manifest.
    assert await archive.verify(AGENT, heads={AGENT: ""}) == [
        f"{AGENT}: segment 4 (000000000004.jsonl.gz): segment(s) 1-4 come after the recorded "
        "head (none): added, or an archive pass stopped before recording its head"]
    # A head for a partition whose manifest is gone.
    assert await archive.verify(heads={"gone": head}) == [
        f"gone: no {MANIFEST}, but the archive's head is recorded as {head[:12]}: the "
        "manifest was removed"]


async def test_verify_names_an_edited_job_index(archive: Archive) -> None:
    await fill(archive, segments=2)
    segments = await archive.segments(AGENT)
    archive.store.put(f"{AGENT}/{segments[0].job_index}", b"")
    assert await archive.verify() == [
        f"{AGENT}: segment 1 (000000000001.jsonl.gz): its job index 000000000001.jobs does not "
        "list the file's jobs (edited)"]


# -- errors ----------------------------------------------------------------------


async def test_unreachable_storage_is_a_clear_error(archive_url: str, tmp_path: Path) -> None:
    if archive_url.startswith("s3://"):
        archive = open_archive(f"s3://aq-missing-{uuid.uuid4().hex[:8]}/x", "agentq")
        expected = rf"^archive {archive.url}: the bucket 'aq-missing-\w+' does not exist$"
    else:
        blocker = tmp_path / "a-file"
        blocker.write_text("not a folder")
        archive = open_archive(f"file://{blocker}", "agentq")
        expected = (rf"^archive {archive.url}: looking up {AGENT}/{MANIFEST} failed: "
                    "NotADirectoryError: ")
        # A folder that is not there yet is an empty archive, not an error.
        assert await open_archive(str(tmp_path / "none"), "agentq").segments(AGENT) == []
    for call in (archive.segments(AGENT), archive.append(AGENT, batch(1, 1, [job_id(T0)])),
                 archive.job_events(AGENT, job_id(T0))):
        with pytest.raises(ArchiveError, match=expected) as caught:
            await call
        assert caught.value.url == archive.url
        assert caught.value.retryable
    with pytest.raises(ArchiveError, match="unsupported storage 'nosuch'"):
        open_archive("nosuch://bucket/x", "agentq")
    with pytest.raises(ArchiveError, match="not a partition name"):
        await archive.segments("../etc")


@pytest.mark.parametrize("ending", [b"\n", b""])
def test_lines_holding_finds_each_line_once_in_order(ending: bytes) -> None:
    """A job's lines are found by searching a segment's text: the first and the
    last line, a line naming the job twice, and none when no line does."""
    lines = [b'{"jobId":"j_1","n":1}', b'{"jobId":"j_2"}', b'{"jobId":"j_1","p":"j_1"}',
             b'{"jobId":"j_3"}', b'{"jobId":"j_1","n":3}']
    text = b"\n".join(lines) + ending
    assert lines_of(text) == lines
    assert lines_holding(text, b'"j_1"') == [lines[0], lines[2], lines[4]]
    assert lines_holding(text, b'"j_3"') == [lines[3]]
    assert lines_holding(text, b'"j_4"') == []
