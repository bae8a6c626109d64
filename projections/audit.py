"""``audit verify``: re-derive every job from the log and compare it with the
state records, the per-state counts, the views and the global job indexes.
Each difference is named.

The log is read a page at a time and folded as it is read, so what is held is
one small derived record per job (a spec or result longer than a few hundred
bytes is kept as its digest), never the log; payloads the log holds by
reference are not read back: their SHA-256 in the log is compared with the
task and result the spec and record hold; records and index memberships
are read in pipelined batches, not one round trip per job. Which records and
index keys exist is found by one SCAN for every partition (a SCAN visits the
whole key space, whatever its pattern).
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Collection, Sequence
from typing import Any

import orjson
from redis.asyncio import Redis

from agentq.eventlog import fold, merged
from agentq.eventlog.archive import Archive, event_key
from agentq.eventlog.keys import Keys, Partition
from agentq.eventlog.reader import readable
from agentq.eventlog.records import normalize
from agentq.eventlog.scripts import Scripts
from agentq.projections.projection import Projection
from agentq.projections.scan import agent_of_key, glob_escape, scan_keys, view_keys
from agentq.schemas.events import PAYLOAD_FIELDS, digest_field, payload_digest
from agentq.schemas.job import STATES, TERMINAL_STATES

_BATCH = 500
_TASK, _RESULT = PAYLOAD_FIELDS["JobDispatched"], PAYLOAD_FIELDS["JobCompleted"]
_TASK_DIGEST, _RESULT_DIGEST = digest_field(_TASK), digest_field(_RESULT)
# A JSON value longer than this is kept as its digest while the log is folded.
_KEPT_WHOLE = 256


class Digest:
    """A long JSON value as its SHA-256: equal to any value with the same JSON
    (keys sorted), and shown by its start."""

    __slots__ = ("length", "sha", "start")

    def __init__(self, text: bytes) -> None:
        self.sha = hashlib.sha256(text).digest()
        self.length = len(text)
        self.start = text[:60].decode(errors="replace")

    @staticmethod
    def json(value: Any) -> bytes:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)

    @classmethod
    def of(cls, value: Any) -> Any:
        """``value`` itself when short, else its digest."""
        text = cls.json(value)
        return value if len(text) <= _KEPT_WHOLE else cls(text)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Digest):
            return self.sha == other.sha
        return hashlib.sha256(self.json(other)).digest() == self.sha

    def __hash__(self) -> int:
        return hash(self.sha)

    def __repr__(self) -> str:
        return f"<{self.length} bytes of JSON: {self.start}... sha256 {self.sha.hex()[:16]}>"


async def _derived(
    redis: Redis, part: Partition, archive: Archive | None, record_ids: Collection[str]
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Every job's record as its events imply it (archived, then live: see
    :mod:`agentq.eventlog.merged`) and each job's dispatcher: folded a page at a
    time, long values kept as digests. A job with no state record that ended
    within the archive has left Redis: it is forgotten as it ends, and the
    events of a job whose dispatch was not seen (one that left Redis, met again)
    are passed over, so that what is held follows the jobs in Redis, not the
    archive's length."""
    derived: dict[str, dict[str, Any]] = {}
    dispatcher: dict[str, str] = {}
    tail = await archive.last(part.agent) if archive is not None else None
    archived_to = event_key(tail.last) if tail is not None else (0, 0)
    async for event in merged.partition_events(redis, archive, part, payloads=False):
        record = derived.get(event.job_id)
        if record is None and (not readable(event) or event.type != "JobDispatched"):
            continue  # a newer agentq's event, or a job that left Redis
        record = fold.apply(record, event)
        if event.job_id not in record_ids and record["state"] in TERMINAL_STATES \
                and event_key(event.event_id) <= archived_to:
            derived.pop(event.job_id, None)  # ended and archived: it left Redis
            dispatcher.pop(event.job_id, None)
            continue
        if event.type == "JobDispatched" and isinstance(record.get("spec"), dict):
            dispatcher[event.job_id] = str(record["spec"].get("dispatchedBy"))
            if (digest := record["spec"].pop(_TASK_DIGEST, None)) is not None:
                record[_TASK_DIGEST] = digest  # compared beside the spec: see _as_logged
            record["spec"] = Digest.of(record["spec"])
        if "result" in record and event.type == "JobCompleted":
            record["result"] = Digest.of(record["result"])
        derived[event.job_id] = record
    return derived, dispatcher


async def _members(redis: Redis, key: str) -> AsyncIterator[str]:
    """Members of an index (all scores 0), a page at a time."""
    low = "-"
    while True:
        page: list[str] = await redis.zrangebylex(key, low, "+", 0, 1000)  # type: ignore[assignment]
        for member in page:
            yield member
        if len(page) < 1000:
            return
        low = f"({page[-1]}"


async def _set(redis: Redis, key: str) -> set[str]:
    return {member async for member in _members(redis, key)}


async def verify_partition(
    redis: Redis, part: Partition, record_ids: Collection[str] | None = None,
    index_keys: Collection[str] | None = None, archive: Archive | None = None,
) -> list[str]:
    """Differences between what ``part``'s events imply (in the log, and in the
    ``archive`` once trimmed from it) and what Redis holds. ``record_ids`` (the
    job ids that have a record) and ``index_keys`` (its index keys) come from
    ``verify``'s one SCAN; else they are scanned for."""
    if record_ids is None:
        record_ids = {key[len(part.job_prefix):] for key in
                      await scan_keys(redis, glob_escape(part.job_prefix) + "*")}
    derived, dispatcher = await _derived(redis, part, archive, record_ids)
    scripts = Scripts(redis)
    problems: list[str] = []
    for job_id in sorted(set(record_ids) - set(derived)):
        problems.append(f"{job_id}: has a state record but no events in {part.log}")
    ordered = sorted(derived)
    for start in range(0, len(ordered), _BATCH):
        chunk = ordered[start : start + _BATCH]
        records = await scripts.records(part, chunk)
        for job_id, record in zip(chunk, records, strict=True):
            problems += _record_problems(job_id, record, derived[job_id])
    states = Counter(str(r["state"]) for r in derived.values())
    counts: dict[str, str] = await redis.hgetall(part.counts)  # type: ignore[assignment]
    for state in STATES:
        if int(counts.get(state, 0)) != states.get(state, 0):
            problems.append(
                f"agent {part.agent}: {counts.get(state, 0)} jobs counted {state}, "
                f"{states.get(state, 0)} by the log"
            )
    await Projection(redis).catch_up([part])
    if index_keys is None:
        index_keys = (await view_keys(redis, Keys(part.prefix))).get(part.agent, set())
    problems += await _verify_views(redis, part, derived, dispatcher, index_keys)
    problems += await _verify_global(redis, part, dispatcher)
    return problems


def _record_problems(job_id: str, record: dict[str, str], expected: dict[str, Any]) -> list[str]:
    if not record:
        return [f"{job_id}: has events but no state record"]
    live = _as_logged(record, normalize(record), expected)
    return [
        f"{job_id}: {field} is {live.get(field)!r} in the state record, "
        f"{expected.get(field)!r} by the log"
        for field in sorted(set(live) | set(expected))
        if live.get(field) != expected.get(field)
    ]


def _as_logged(
    record: dict[str, str], live: dict[str, Any], expected: dict[str, Any]
) -> dict[str, Any]:
    """The normalized live record with each payload the log holds by reference
    (``expected`` has its digest) replaced by its digest, taken as the writer
    took it: of the task's JSON, of the result's stored text."""
    spec = live.get("spec")
    if _TASK_DIGEST in expected and isinstance(spec, dict) and _TASK in spec:
        spec = dict(spec)
        live[_TASK_DIGEST] = payload_digest(orjson.dumps(spec.pop(_TASK)))
        live["spec"] = spec
    if _RESULT_DIGEST in expected and _RESULT in record:
        live[_RESULT_DIGEST] = payload_digest(record[_RESULT].encode())
        live.pop(_RESULT, None)
    return live


async def _verify_views(
    redis: Redis, part: Partition, derived: dict[str, Any], dispatcher: dict[str, str],
    index_keys: Collection[str],
) -> list[str]:
    problems = []
    # Every job is in exactly one state index (their union lists every job), so
    # the state check below also names a job listed nowhere, or not in the log.
    in_state = {state: await _set(redis, part.index_state(state)) for state in STATES}
    expected_by: dict[str, set[str]] = defaultdict(set)
    for job_id, by in dispatcher.items():
        expected_by[by].add(job_id)
    by_prefix = part.index_by("")
    seen_dispatchers = {key[len(by_prefix):] for key in index_keys if key.startswith(by_prefix)}
    for by in sorted(seen_dispatchers | set(expected_by)):
        listed_by = await _set(redis, part.index_by(by))
        wanted = expected_by.get(by, set())
        for job_id in sorted(listed_by - wanted):
            problems.append(f"{job_id}: listed as dispatched by {by}, but the log says "
                            f"{dispatcher.get(job_id)}")
        for job_id in sorted(wanted - listed_by):
            problems.append(f"{job_id}: dispatched by {by} by the log, but not listed "
                            f"as dispatched by {by}")
    for state, members in in_state.items():
        expected = {j for j, r in derived.items() if r["state"] == state}
        for job_id in sorted(members - expected):
            problems.append(f"{job_id}: listed as {state}, but the log says "
                            f"{derived.get(job_id, {}).get('state', 'nothing')}")
        for job_id in sorted(expected - members):
            problems.append(f"{job_id}: {state} by the log, but not listed as {state}")
    return problems


async def _verify_global(redis: Redis, part: Partition, dispatcher: dict[str, str]) -> list[str]:
    """Every job of the partition is in the global indexes (``list`` across agents
    would miss it otherwise). Members without a job are harmless and not named."""
    keys = Keys(part.prefix)
    problems = []
    jobs = sorted(dispatcher.items())
    for start in range(0, len(jobs), _BATCH):
        chunk = jobs[start : start + _BATCH]
        by: dict[str, list[str]] = defaultdict(list)
        for job_id, dispatched_by in chunk:
            by[dispatched_by].append(job_id)
        # One ZMSCORE per index for the batch, not one ZSCORE per job and index.
        async with redis.pipeline(transaction=False) as pipe:
            pipe.zmscore(keys.jobs_index(), [job_id for job_id, _ in chunk])
            for dispatched_by, ids in by.items():
                pipe.zmscore(keys.jobs_by(dispatched_by), ids)
            every, *of_each = await pipe.execute()
        for (job_id, _), score in zip(chunk, every, strict=True):
            if score is None:
                problems.append(f"{job_id}: in the log but not in the global index of jobs "
                                f"(agent {part.agent})")
        for (dispatched_by, ids), scores in zip(by.items(), of_each, strict=True):
            problems += [f"{job_id}: dispatched by {dispatched_by} by the log, but not in the "
                         f"global index of jobs dispatched by {dispatched_by}"
                         for job_id, score in zip(ids, scores, strict=True) if score is None]
    return problems


async def _record_ids(redis: Redis, keys: Keys) -> dict[str, set[str]]:
    """Per agent, the ids of the jobs that have a state record (one SCAN)."""
    found: dict[str, set[str]] = defaultdict(set)
    for key in await scan_keys(redis, glob_escape(keys.prefix) + ":{*}:job:*"):
        agent = agent_of_key(keys.prefix, key)
        prefix = keys.partition(agent).job_prefix if agent is not None else ""
        if agent is not None and key.startswith(prefix):
            found[agent].add(key[len(prefix):])
    return found


async def verify(redis: Redis, parts: Sequence[Partition], archive: Archive | None = None
                 ) -> list[str]:
    """Every difference found in ``parts``; empty when all agree with their events
    (in the log, and in the ``archive`` once trimmed from it)."""
    if not parts:
        return []
    keys = Keys(parts[0].prefix)
    record_ids = await _record_ids(redis, keys)
    index_keys = await view_keys(redis, keys)
    problems: list[str] = []
    for part in parts:
        problems += await verify_partition(redis, part, record_ids.get(part.agent, set()),
                                           index_keys.get(part.agent, set()), archive)
    return problems
