"""The Lua transitions, loaded once and called through one typed wrapper each.

Every script runs in one partition. Each wrapper passes every key in KEYS and
turns the script's refusals into :mod:`agentq.schemas.errors` exceptions or typed
outcomes. Scripts are called by SHA (EVALSHA) and reloaded on NOSCRIPT, which
redis-py's ``register_script`` does for us.

On a Redis Cluster a batch goes per node (``ClusterClient.send_by_node``), and a
write acknowledged to a caller can be confirmed on replicas first (``WAIT``,
``redis.waitReplicas``): see :class:`Confirm`.
"""

from __future__ import annotations

import asyncio
import random
import re
import struct
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Literal, NamedTuple

import orjson
from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, ResponseError

from agentq.eventlog.connection import cluster_of
from agentq.eventlog.keys import PRIORITY_CODES, WORKERS_GROUP, Keys, Partition, is_paged
from agentq.eventlog.records import with_kept_apart
from agentq.schemas.config import JobsConfig, RedisConfig
from agentq.schemas.errors import Unavailable
from agentq.schemas.events import (
    PAYLOAD_FIELDS,
    PAYLOAD_INLINE_MAX,
    digest_field,
    payload_digest,
)
from agentq.schemas.job import STATES

_LUA = resources.files("agentq.eventlog") / "lua"
SCRIPT_NAMES = (
    "dispatch", "start", "complete", "fail", "stall", "retry", "cancel", "drain", "promote",
    "rate", "progress", "renew", "register", "resolve", "rearm", "project",
    "endings", "release", "heartbeat", "swap", "history", "presence", "takeover", "activity",
    "index", "owners", "survey", "expire", "schedule", "schedule_due", "schedule_tick",
    "schedule_name", "approve", "reject", "adopt", "metrics", "unindex", "record",
    "records", "index_range", "index_has", "index_size", "index_edit", "index_both",
    "created",
)  # fmt: skip


# A helper of the prelude: its comment lines, its definition, up to its `end`.
_HELPER = re.compile(r"(?:^--[^\n]*\n)*^local function (aq_\w+)\(.*?^end\n", re.M | re.S)
_CALLED = re.compile(r"\baq_\w+")
# The doorbell's state (``_lib.lua``'s ``aq_ring``): what the script appended,
# delayed and leased, whether it was loud, set by the helpers and rung once when
# the script ends.
_BELL = "local bell_log, bell_due, bell_lease, bell_loud\n"
# Scripts.histories walks this many jobs' chains in one script call.
_HISTORIES_PER_CALL = 100


@cache
def script_source(name: str) -> str:
    """The full text of one script: the prelude's helpers it calls (directly or
    through another helper), in the prelude's order, then the script. Every
    helper defined costs a closure on every call, so the others are left out.

    A script that appends to the partition log (``bell_log`` is set by the
    helpers that do) runs as a function, after which ``aq_ring`` publishes the
    doorbell once for the whole call, however many events it appended."""
    body = (_LUA / f"{name}.lua").read_text()
    helpers = {m.group(1): m.group(0) for m in _HELPER.finditer((_LUA / "_lib.lua").read_text())}

    def needed(names: set[str]) -> set[str]:
        wanted: set[str] = set()
        pending = set(names)
        while pending:
            helper = pending.pop()
            if helper in helpers and helper not in wanted:
                wanted.add(helper)
                pending |= set(_CALLED.findall(helpers[helper])) - {helper}
        return wanted

    wanted = needed(set(_CALLED.findall(body)))
    rings = "bell_log" in body or any("bell_log" in helpers[h] for h in wanted)
    if rings:
        wanted |= needed({"aq_ring"})
    prelude = "".join(text for helper, text in helpers.items() if helper in wanted)
    if not rings:
        return prelude + "\n" + body
    return (_BELL + prelude + "\nlocal bell_reply = (function()\n" + body
            + "\nend)()\naq_ring()\nreturn bell_reply\n")


def _global_index_args(keys: Keys, jobs: Sequence[tuple[str, str]], stage: str = ""
                       ) -> tuple[list[str], list[str]]:
    """The keys and arguments of ``index.lua`` and ``unindex.lua`` for ``(job id,
    dispatcher)`` pairs: the index of every job, then one per dispatcher, whose
    ids go in one space-separated argument, in id order (``stage``: a rebuild's
    copies)."""
    by: dict[str, list[str]] = {}
    for job_id, dispatcher in jobs:
        by.setdefault(dispatcher, []).append(job_id)
    # In id order: the paged indexes' appends look at the directory once a batch.
    return ([keys.jobs_index(stage), *(keys.jobs_by(d, stage) for d in by)],
            [" ".join(sorted(ids)) for ids in by.values()])


def job_keys(part: Partition) -> list[str]:
    """The nine keys every job script takes first, in the order the scripts name them."""
    return [
        part.counts, part.log, part.leases, part.active, part.delayed, *part.ready_streams,
        part.timers,
    ]  # fmt: skip


@dataclass(frozen=True, slots=True)
class ScriptCall:
    """One script call, to be sent with others in one round trip."""

    name: str
    keys: list[str]
    args: list[Any]


class NewJob(NamedTuple):
    """One job of a dispatch batch, as the dispatch script takes it (a tuple:
    made for every dispatched job, and cheaper to make than a frozen dataclass)."""

    job_id: str
    spec_json: bytes
    max_attempts: int
    priority: str
    delay_ms: int
    idempotency_key: str | None
    depends_on: Sequence[str]
    caller: str
    requires_approval: bool = False


@dataclass(frozen=True, slots=True)
class Refusal:
    """A script refused: SPEC's code plus the details the script gave."""

    code: str
    details: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DispatchOutcome:
    """Per job of the batch, in order: (job id, state, its JobDispatched event
    id) for a new job, or (first job id, "existing", "") for an idempotent repeat."""

    at: int
    jobs: list[tuple[str, str, str]]


@dataclass(frozen=True, slots=True)
class StartedJob:
    job_id: str
    record: dict[str, str]


@dataclass(frozen=True, slots=True)
class Backoff:
    """Retry delays: the k-th failed attempt waits about base·2^(k-1), at most max."""

    base_ms: int
    max_ms: int

    @classmethod
    def of(cls, jobs: JobsConfig) -> Backoff:
        return cls(int(jobs.backoff_base_seconds * 1000), int(jobs.backoff_max_seconds * 1000))


@dataclass(frozen=True, slots=True)
class PartitionActivity:
    """What ``activity.lua`` read of one partition: jobs per state, live workers,
    the last event's time (µs; None when the log is empty), and the active jobs
    with their specs (JSON; None for a job gone meanwhile)."""

    counts: dict[str, int]
    workers: int
    last_at: int | None
    active: list[tuple[str, str | None]]


@dataclass(frozen=True, slots=True)
class Timed:
    """What a script that judged times by the server's clock did: the job ids it
    acted on, the next time (ms) something falls due (None: nothing waits), and
    the server's time (ms) it judged by, so callers wait without their own clock."""

    ids: list[str]
    next_ms: int | None
    now_ms: int

    @classmethod
    def of(cls, reply: Sequence[Any]) -> Timed:
        return cls(list(reply[0]), int(float(reply[1])) if reply[1] else None, int(reply[2]))

    def seconds_until_next(self, at_most: float) -> float:
        """Seconds from the server's now to the next due time, at most ``at_most``."""
        if self.next_ms is None:
            return at_most
        return min(at_most, max(0.0, (self.next_ms - self.now_ms) / 1000))


@dataclass(frozen=True, slots=True)
class ScheduleDue:
    """What ``schedule_due.lua`` found: the server's time (ms), the earliest next
    tick of the partition's active schedules (None: none), and each due schedule
    as (name, tick ms, definition JSON; "" when it is gone)."""

    now_ms: int
    next_ms: int | None
    due: list[tuple[str, int, str]]

    @classmethod
    def of(cls, reply: Sequence[Any]) -> ScheduleDue:
        rest = reply[2:]
        due = [(str(rest[i]), int(float(rest[i + 1])), str(rest[i + 2] or ""))
               for i in range(0, len(rest), 3)]
        return cls(int(reply[0]), int(float(reply[1])) if reply[1] else None, due)


@dataclass(frozen=True, slots=True)
class GroupState:
    """Where a consumer group of a partition log stands: entries delivered and
    not acknowledged, and the last entry it delivered."""

    pending: int
    delivered: str


@dataclass(frozen=True, slots=True)
class Survey:
    """One look at a partition (``survey.lua``): the server's time (ms), the log's
    last entry id ("" when empty), the next run time and lease deadline (ms, None
    when nothing waits), and each group asked about (None: no such group)."""

    now_ms: int
    last_id: str
    next_run_ms: int | None
    next_lease_ms: int | None
    groups: dict[str, GroupState | None]

    @classmethod
    def of(cls, reply: Sequence[Any], groups: Sequence[str]) -> Survey:
        states: dict[str, GroupState | None] = {}
        for group, state in zip(groups, reply[4:], strict=True):
            pending, _, delivered = str(state).partition(" ")
            states[group] = GroupState(int(pending), delivered) if state else None
        return cls(int(reply[0]), str(reply[1]), int(float(reply[2])) if reply[2] else None,
                   int(float(reply[3])) if reply[3] else None, states)

    def undelivered(self, group: str) -> bool:
        """Whether ``group`` has entries of the log it has not delivered yet."""
        state = self.groups.get(group)
        return bool(self.last_id) and (state is None or state.delivered != self.last_id)


@dataclass(frozen=True, slots=True)
class Expired:
    """What one ``expire.lua`` call did: the jobs it removed from the partition,
    each with its dispatcher ("" when unknown), still to be taken out of the
    global job indexes (they are listed in ``Partition.expired`` until then);
    whether to call again (a full batch of candidates, some of which left
    ``ended``); and the server's time (ms) it judged by."""

    jobs: list[tuple[str, str]]
    again: bool
    now_ms: int
    batch: str = ""
    """The field of ``Partition.expired`` that lists ``jobs`` ("" when none)."""

    @classmethod
    def of(cls, reply: Sequence[Any]) -> Expired:
        flat, full, progress, now_ms, batch = reply
        jobs = [(str(flat[i]), str(flat[i + 1])) for i in range(0, len(flat), 2)]
        return cls(jobs, bool(int(full)) and int(progress) > 0, int(now_ms), str(batch))


def expired_jobs(field: str, value: str) -> list[tuple[str, str]]:
    """One field of ``Partition.expired`` as ``(job id, dispatcher)`` pairs: a batch
    (its first job id -> '<job id> <dispatcher>' lines), or, as a version before
    wrote it, one job (its id -> its dispatcher, which holds no space)."""
    if " " not in value:
        return [(field, value)]
    return [(job_id, by) for line in value.split("\n")
            for job_id, _, by in [line.partition(" ")]]


async def ensure_group(redis: Redis, stream: str, group: str) -> None:
    """Create consumer group ``group`` on ``stream`` at its start (never at ``$``,
    which would skip what is already there). Idempotent."""
    try:
        await redis.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def ensure_work_groups(redis: Redis, part: Partition) -> None:
    """The ``workers`` group on each of the partition's ready streams."""
    for stream in part.ready_streams:
        await ensure_group(redis, stream, WORKERS_GROUP)


# A packed field's length, as dispatch.lua's struct.unpack reads it.
_LENGTH = struct.Struct("<i")
_TASK = PAYLOAD_FIELDS["JobDispatched"]
_TASK_MEMBER = f'"{_TASK}":'.encode()
_TASK_DIGEST = digest_field(_TASK)


def task_reference(spec_json: bytes) -> bytes:
    """How dispatch.lua puts the task in the JobDispatched event: ``b""`` to
    copy the spec whole (a short task stays inline), else ``b"<start> <end>
    <sha256>"``: the byte span of the spec's ``"task":<JSON>`` member, which the
    event carries as ``"taskSha256":"<sha256>"`` (the spec holds the task).

    The span is taken only when the text the event would then carry reads as
    exactly the spec with the task's digest at its place; any other spec (one
    not written by orjson, say) keeps its task inline."""
    if len(spec_json) <= PAYLOAD_INLINE_MAX:
        return b""
    spec = orjson.loads(spec_json)
    task = spec.get(_TASK) if isinstance(spec, dict) else None
    if not isinstance(task, str):
        return b""
    task_json = orjson.dumps(task)
    if len(task_json) <= PAYLOAD_INLINE_MAX:
        return b""
    member = _TASK_MEMBER + task_json
    start = spec_json.find(member)
    if start < 1:
        return b""
    end = start + len(member)
    digest = payload_digest(task_json)
    logged = spec_json[:start] + f'"{_TASK_DIGEST}":"{digest}"'.encode() + spec_json[end:]
    expected = [(_TASK_DIGEST, digest) if name == _TASK else (name, value)
                for name, value in spec.items()]
    try:
        if list(orjson.loads(logged).items()) != expected:
            return b""
    except orjson.JSONDecodeError:
        return b""
    return f"{start} {end} {digest}".encode()


def result_reference(result_json: bytes) -> str:
    """The result's digest, which the JobCompleted event carries instead of a
    result longer than ``PAYLOAD_INLINE_MAX`` bytes of JSON; "" to carry it inline."""
    return payload_digest(result_json) if len(result_json) > PAYLOAD_INLINE_MAX else ""


def _pairs(flat: Sequence[Any]) -> dict[str, str]:
    return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}


def _in_order(fields: Mapping[str, str]) -> list[str]:
    """An event's names and values, flat, in the order history.lua returns them."""
    flat: list[str] = []
    for name in ("type", "jobId", "v", "at", "actor", "data", "p"):
        flat += (name, fields.get(name, ""))
    if "q" in fields:
        flat += ("q", fields["q"])
    return flat


# The scripts whose writes are acknowledged to a caller (dispatch, cancel, retry,
# drain, a worker's completion or failure): with redis.waitReplicas, confirmed on
# replicas before the caller is answered.
CONFIRMED = frozenset({"dispatch", "cancel", "retry", "drain", "complete", "fail", "approve",
                       "reject"})


@dataclass(frozen=True, slots=True)
class Confirm:
    """``redis.waitReplicas``: a write acknowledged to a caller is followed, on the
    same connection, by ``WAIT replicas timeout_ms`` before the caller is answered."""

    replicas: int
    timeout_ms: int

    @classmethod
    def of(cls, redis: RedisConfig) -> Confirm | None:
        """The config's confirmation, None when ``waitReplicas`` is 0."""
        return cls(redis.wait_replicas, redis.wait_timeout_ms) if redis.wait_replicas else None


class NotConfirmed(Unavailable):
    """Fewer replicas than ``redis.waitReplicas`` confirmed a write in time. The
    write was made (``replies`` holds the scripts' replies, as :meth:`Scripts.call_many`
    returns them); a failover may still lose it."""

    def __init__(self, confirmed: int, wanted: int, replies: list[Any]) -> None:
        super().__init__(f"Write not confirmed by {confirmed}/{wanted} replicas; "
                         "it may be lost on failover")
        self.confirmed = confirmed
        self.wanted = wanted
        self.replies = replies


# Each client's scripts, registered once: registering hashes every script's text
# (about 130 µs for them all), and queries make a Scripts per call.
_REGISTERED: weakref.WeakKeyDictionary[Redis, dict[str, AsyncScript]] = \
    weakref.WeakKeyDictionary()


def _registered(redis: Redis) -> dict[str, AsyncScript]:
    scripts = _REGISTERED.get(redis)
    if scripts is None:
        scripts = _REGISTERED[redis] = {
            name: redis.register_script(script_source(name)) for name in SCRIPT_NAMES}
    return scripts


class Scripts:
    """The transition scripts, registered on one client. With ``confirm``, a call
    of a script of :data:`CONFIRMED` is confirmed on replicas (:class:`NotConfirmed`
    when too few confirm)."""

    def __init__(self, redis: Redis, confirm: Confirm | None = None) -> None:
        self.redis = redis
        self.confirm = confirm
        self._cluster = cluster_of(redis)
        self._scripts = _registered(redis)

    def _call(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Awaitable[Any]:
        """Call one script (EVALSHA; on NOSCRIPT it is loaded and called again)."""
        if self.confirm is not None and name in CONFIRMED:
            return self._call_one_confirmed(ScriptCall(name, list(keys), list(args)))
        return self._scripts[name](keys=keys, args=args, client=self.redis)

    async def _call_one_confirmed(self, call: ScriptCall) -> Any:
        (reply,) = await self.call_many([call])
        return reply

    @property
    def on_cluster(self) -> bool:
        """Whether calls go to a cluster's nodes (else all on one connection, run
        in the order sent)."""
        return self._cluster is not None

    async def call_many(self, calls: Sequence[ScriptCall]) -> list[Any]:
        """Several script calls in one round trip (on a cluster, one per node, all at
        once); replies in order. With a :class:`Confirm` and a call of
        :data:`CONFIRMED`, the calls are followed by ``WAIT`` on the same
        connection, and :class:`NotConfirmed` is raised (with the replies) when
        fewer replicas confirm.

        Sent as plain EVALSHA: redis-py would check every script with SCRIPT
        EXISTS before each pipeline, a second round trip. A call refused with
        NOSCRIPT (the server's script cache was emptied) did nothing, so it is
        simply made again once the script is loaded.
        """
        wait = self.confirm if self.confirm and any(c.name in CONFIRMED for c in calls) \
            else None
        if self._cluster is not None or wait is not None:
            return await self._call_confirmed(calls, wait)
        if len(calls) == 1:  # a plain command costs the client less than a pipeline
            call = calls[0]
            sha = self._scripts[call.name].sha
            try:
                return [await self.redis.evalsha(sha, len(call.keys), *call.keys, *call.args)]
            except NoScriptError:
                return [await self._call(call.name, call.keys, call.args)]
        async with self.redis.pipeline(transaction=False) as pipe:
            for call in calls:
                sha = self._scripts[call.name].sha
                pipe.evalsha(sha, len(call.keys), *call.keys, *call.args)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        for index, reply in enumerate(replies):
            if isinstance(reply, NoScriptError):
                call = calls[index]
                replies[index] = await self._call(call.name, call.keys, call.args)
            elif isinstance(reply, Exception):
                raise reply
        return replies

    async def ask_many(self, asks: Sequence[ScriptCall | Callable[[Any], object]]
                       ) -> list[Any]:
        """Replies to ``asks``, in their order: the script calls by
        :meth:`call_many`, and at the same time the others (each a function that
        queues one plain command on a pipeline) in one pipeline. For reads that
        mix both forms, e.g. an index kept as one sorted set or paged
        (``keys.is_paged``)."""
        calls: list[tuple[int, ScriptCall]] = []
        plain: list[tuple[int, Callable[[Any], object]]] = []
        for i, ask in enumerate(asks):
            if isinstance(ask, ScriptCall):
                calls.append((i, ask))
            else:
                plain.append((i, ask))

        async def commands() -> list[Any]:
            if not plain:
                return []
            async with self.redis.pipeline(transaction=False) as pipe:
                for _, queue in plain:
                    queue(pipe)
                replies: list[Any] = await pipe.execute()
                return replies

        async def scripts() -> list[Any]:
            return await self.call_many([call for _, call in calls]) if calls else []

        if plain and calls:
            plain_replies, call_replies = await asyncio.gather(commands(), scripts())
        else:  # one kind: no tasks to make
            plain_replies, call_replies = await commands(), await scripts()
        replies: list[Any] = [None] * len(asks)
        for (i, _), reply in zip(plain, plain_replies, strict=True):
            replies[i] = reply
        for (i, _), reply in zip(calls, call_replies, strict=True):
            replies[i] = reply
        return replies

    async def _call_confirmed(self, calls: Sequence[ScriptCall], wait: Confirm | None
                              ) -> list[Any]:
        """:meth:`call_many` on a cluster (per node), or followed by WAIT."""
        replies, confirmed = await self._send(calls, wait)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        if wait is not None and (confirmed is None or confirmed < wait.replicas):
            raise NotConfirmed(confirmed or 0, wait.replicas, replies)
        return replies

    async def _send(self, calls: Sequence[ScriptCall], wait: Confirm | None
                    ) -> tuple[list[Any], int | None]:
        """The replies (errors in place) and the fewest replicas a WAIT counted. Calls
        refused with NOSCRIPT are made again, with their own WAIT, once loaded."""
        commands: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
            (("EVALSHA", self._scripts[c.name].sha, len(c.keys), *c.keys, *c.args), {})
            for c in calls]
        waiting = (wait.replicas, wait.timeout_ms) if wait else None
        confirmed: int | None
        if self._cluster is not None:
            sent = await self._cluster.send_by_node(commands, wait=waiting)
            replies, confirmed = sent.replies, sent.confirmed
        else:
            async with self.redis.pipeline(transaction=False) as pipe:
                for command, _ in commands:
                    pipe.execute_command(*command)
                if waiting:
                    pipe.execute_command("WAIT", *waiting)
                replies = await pipe.execute(raise_on_error=False)
            counted = replies.pop() if waiting else None
            if isinstance(counted, Exception):
                raise counted
            confirmed = None if counted is None else int(counted)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if not missing:
            return replies, confirmed
        for name in {calls[i].name for i in missing}:
            script = self._scripts[name]
            script.sha = await self.redis.script_load(script.script)
        again, confirmed_again = await self._send([calls[i] for i in missing], wait)
        for index, reply in zip(missing, again, strict=True):
            replies[index] = reply
        if len(missing) == len(calls):  # nothing of the first send ran
            return replies, confirmed_again
        if confirmed is None or confirmed_again is None:
            return replies, None if wait else confirmed
        return replies, min(confirmed, confirmed_again)

    # -- dispatch ----------------------------------------------------------

    @staticmethod
    def dispatch_call(
        part: Partition,
        jobs: Sequence[NewJob],
        *,
        actor: str,
        max_queue_depth: int,
        idempotency_ttl: int,
    ) -> ScriptCall:
        """The dispatch script's call for one partition's batch (run it with
        :meth:`call_many`); decode each reply with :meth:`dispatch_outcome`."""
        callers = {job.caller for job in jobs}
        if len(callers) != 1:
            raise ValueError("a dispatch batch has one caller")
        keys = [part.meta, part.counts, part.log, part.delayed, *part.ready_streams, part.timers]
        packed = bytearray()
        for job in jobs:
            for value in (
                job.job_id.encode(),
                job.spec_json,
                str(job.max_attempts).encode(),
                PRIORITY_CODES[job.priority].encode(),
                str(job.delay_ms).encode(),
                (job.idempotency_key or "").encode(),
                " ".join(job.depends_on).encode(),
                task_reference(job.spec_json),
                b"1" if job.requires_approval else b"",
            ):
                packed += _LENGTH.pack(len(value))
                packed += value
        args: list[Any] = [
            max_queue_depth, actor, idempotency_ttl, part.job_prefix,
            part.idempotency(callers.pop(), ""), part.deps(""), bytes(packed), part.spec_prefix,
        ]
        return ScriptCall("dispatch", keys, args)

    @staticmethod
    def dispatch_outcome(reply: Sequence[Any]) -> DispatchOutcome | Refusal:
        if reply[0] != "ok":
            return Refusal(reply[0], tuple(str(x) for x in reply[1:]))
        jobs = [(reply[i], reply[i + 1], reply[i + 2]) for i in range(2, len(reply), 3)]
        return DispatchOutcome(int(reply[1]), jobs)

    # -- work --------------------------------------------------------------

    async def start(
        self, part: Partition, worker: str, lease_ms: int, want: int
    ) -> tuple[list[StartedJob], dict[str, str]]:
        """Take up to ``want`` ready jobs, high priority first, and start them.

        Returns the jobs started and, when fewer than ``want`` were (the streams
        were read to their ends), the position where each ready stream ends
        (stream key -> entry id) to block on with XREAD.
        """
        call = self.start_call(part, worker, lease_ms, want)
        return self.start_outcome(part, await self._call(call.name, call.keys, call.args))

    @staticmethod
    def start_call(part: Partition, worker: str, lease_ms: int, want: int) -> ScriptCall:
        return ScriptCall("start", job_keys(part),
                          [worker, lease_ms, want, part.job_prefix, part.spec_prefix])

    @staticmethod
    def start_outcome(
        part: Partition, reply: Sequence[Any]
    ) -> tuple[list[StartedJob], dict[str, str]]:
        started, tails = reply
        jobs = [StartedJob(job_id, {**_pairs(record), "spec": spec})
                for job_id, record, spec in started]
        return jobs, dict(zip(part.ready_streams, tails, strict=False))

    async def complete(
        self, part: Partition, actor: str, finished: Sequence[tuple[str, int, bytes]]
    ) -> list[Refusal | None]:
        """Complete attempts ``(job id, attempt, result JSON)``; None where accepted."""
        call = self.complete_call(part, actor, finished)
        return self.complete_outcome(await self._call(call.name, call.keys, call.args))

    @staticmethod
    def complete_call(
        part: Partition, actor: str, finished: Sequence[tuple[str, int, bytes]]
    ) -> ScriptCall:
        keys = job_keys(part) + [part.job(job_id) for job_id, _, _ in finished]
        args: list[Any] = [actor, len(finished)]
        digests: list[str] = []
        for i, (job_id, attempt, result) in enumerate(finished, 1):
            args += [job_id, attempt, result]
            if reference := result_reference(result):
                digests += [str(i), reference]
        args += [part.dependents(""), part.spec_prefix, " ".join(digests), part.result_prefix]
        return ScriptCall("complete", keys, args)

    @staticmethod
    def complete_outcome(reply: Sequence[Any]) -> list[Refusal | None]:
        return [None if r[0] == "ok" else Refusal(r[0], tuple(r[1:])) for r in reply]

    async def fail(
        self, part: Partition, actor: str, job_id: str, attempt: int, error: str, backoff: Backoff
    ) -> Refusal | str:
        """Fail one attempt; returns the job's new state or the refusal."""
        call = self.fail_call(part, actor, job_id, attempt, error, backoff)
        return self.fail_outcome(await self._call(call.name, call.keys, call.args))

    @staticmethod
    def fail_call(
        part: Partition, actor: str, job_id: str, attempt: int, error: str, backoff: Backoff
    ) -> ScriptCall:
        keys = [*job_keys(part), part.job(job_id)]
        args = [actor, job_id, attempt, error, backoff.base_ms, backoff.max_ms, random.random()]
        return ScriptCall("fail", keys, args)

    @staticmethod
    def fail_outcome(reply: Sequence[Any]) -> Refusal | str:
        return str(reply[1]) if reply[0] == "ok" else Refusal(reply[0], tuple(reply[1:]))

    async def progress(
        self, part: Partition, actor: str, job_id: str, attempt: int, progress_json: bytes
    ) -> Refusal | None:
        keys = [*job_keys(part), part.job(job_id)]
        reply = await self._call("progress", keys, [actor, job_id, attempt, progress_json])
        return None if reply[0] == "ok" else Refusal(reply[0], tuple(reply[1:]))

    async def renew(
        self, part: Partition, lease_ms: int, held: Sequence[tuple[str, int]]
    ) -> list[bool]:
        """Extend leases of ``(job id, attempt)``; False where the attempt is no longer current."""
        call = self.renew_call(part, lease_ms, held)
        reply = await self._call(call.name, call.keys, call.args)
        return [bool(r) for r in reply]

    async def release(
        self, part: Partition, worker: str, held: Sequence[tuple[str, int]]
    ) -> list[str]:
        """Hand back ``(job id, attempt)`` held by ``worker`` that have not ended:
        active -> queued, the attempt not charged; returns the ids released."""
        keys = job_keys(part) + [part.job(job_id) for job_id, _ in held]
        args: list[Any] = [worker, len(held)]
        for job_id, attempt in held:
            args += [job_id, attempt]
        return list(await self._call("release", keys, args))

    async def presence(self, registry: str, name: str, timeout_ms: int, forget_ms: int,
                       leaving: bool) -> Any:
        """Renew process ``name``'s deadline in ``registry`` (``leaving``: mark it
        dead now); the reply is the server's time (ms) and the registry before."""
        return await self._call("presence", [registry],
                                [name, timeout_ms, forget_ms, "1" if leaving else "0"])

    async def takeover(self, stream: str, group: str, taker: str, batch: int,
                       dead: Sequence[str]) -> int:
        """Move up to ``batch`` pending entries of each ``dead`` consumer of ``group``
        to ``taker``, deleting those left with nothing; returns the entries moved."""
        return int(await self._call("takeover", [stream], [group, taker, batch, *dead]))

    async def owners(self, registry: str, owners: str, name: str, timeout_ms: int,
                     forget_ms: int, *, leaving: bool, channel: str, want: Sequence[int],
                     release: Sequence[int]) -> Any:
        """Process ``name``'s beat with its shard leases (``owners.lua``): renew its
        deadline (``leaving``: mark it dead and release all), release ``release``,
        claim those of ``want`` that are free or held by the dead, and publish
        ``!owners`` on ``channel`` unless it is "". The reply is the server's time
        (ms), the registry and the owners hash after the beat."""
        args = [name, timeout_ms, forget_ms, "1" if leaving else "0", channel,
                " ".join(map(str, want)), " ".join(map(str, release))]
        return await self._call("owners", [registry, owners], args)

    async def expire(self, part: Partition, retention_ms: int, limit: int, archived: str,
                     forget_workers_ms: int) -> Expired:
        """Remove up to ``limit`` jobs of ``part`` that ended more than ``retention_ms``
        ago by the server's clock and whose every event is at or before the
        archived event ``archived`` ("" removes none): record, spec, dependency
        sets, view entries and count, in one step (``expire.lua``). Heartbeats of
        ``part.workers`` more than ``forget_workers_ms`` past their deadline go too."""
        keys = [part.counts, part.ended, part.expired, part.index_all,
                *(part.index_state(s) for s in ("completed", "failed", "cancelled")),
                part.workers]
        args = [retention_ms, limit, archived, part.job_prefix, part.spec_prefix,
                part.deps(""), part.dependents(""), part.index_by(""), forget_workers_ms,
                part.result_prefix]
        return Expired.of(await self._call("expire", keys, args))

    @staticmethod
    def survey_call(part: Partition, groups: Sequence[str]) -> ScriptCall:
        """One look at ``part`` for its background work (decode with :meth:`Survey.of`)."""
        return ScriptCall("survey", [part.log, part.delayed, part.leases, part.schedule_next],
                          list(groups))

    async def survey(self, part: Partition, groups: Sequence[str]) -> Survey:
        """Where ``part``'s log ends, where ``groups`` stand, when its next delayed
        job and lease fall due, and the server's time."""
        call = self.survey_call(part, groups)
        return Survey.of(await self._call(call.name, call.keys, call.args), groups)

    async def heartbeat(self, part: Partition, worker: str, timeout_ms: int) -> int:
        """Say ``worker`` is alive for ``timeout_ms`` more (server clock); returns
        the deadline (ms)."""
        call = self.heartbeat_call(part, worker, timeout_ms)
        return int(await self._call(call.name, call.keys, call.args))

    @staticmethod
    def heartbeat_call(part: Partition, worker: str, timeout_ms: int) -> ScriptCall:
        """A worker's heartbeat: its presence deadline, now + ``timeout_ms`` by the
        server's clock (reply: the deadline in ms)."""
        return ScriptCall("heartbeat", [part.workers], [worker, timeout_ms])

    @staticmethod
    def renew_call(part: Partition, lease_ms: int, held: Sequence[tuple[str, int]]) -> ScriptCall:
        """:meth:`renew` as a call for :meth:`call_many` (reply: 1 or 0 per job)."""
        keys = job_keys(part) + [part.job(job_id) for job_id, _ in held]
        args: list[Any] = [lease_ms, len(held)]
        for job_id, attempt in held:
            args += [job_id, attempt]
        return ScriptCall("renew", keys, args)

    async def stall(
        self, part: Partition, actor: str, job_ids: Sequence[str], backoff: Backoff
    ) -> list[str]:
        """Reclaim those of ``job_ids`` whose lease has expired; returns the ids reclaimed."""
        keys = job_keys(part) + [part.job(job_id) for job_id in job_ids]
        args: list[Any] = [actor, backoff.base_ms, backoff.max_ms, len(job_ids)]
        for job_id in job_ids:
            args += [job_id, random.random()]
        reclaimed, _, _ = await self._call("stall", keys, args)
        return list(reclaimed)

    async def stall_due(
        self, part: Partition, actor: str, backoff: Backoff, limit: int
    ) -> Timed:
        """Reclaim up to ``limit`` jobs whose lease has expired by the server's clock
        (the script finds them); returns them, the next lease deadline and Redis's time."""
        args = [actor, backoff.base_ms, backoff.max_ms, "due", part.job_prefix, limit,
                random.randrange(1 << 31)]
        return Timed.of(await self._call("stall", job_keys(part), args))

    # -- operator commands -------------------------------------------------

    async def retry(self, part: Partition, actor: str, job_id: str) -> Refusal | None:
        keys = [*job_keys(part), part.job(job_id)]
        reply = await self._call("retry", keys, [actor, job_id])
        return None if reply[0] == "ok" else Refusal(reply[0], tuple(reply[1:]))

    async def cancel(
        self, part: Partition, actor: str, job_id: str, *, is_system: bool,
        cascade: bool = False, parent_id: str = "",
    ) -> Refusal | str:
        """Cancel one job; returns the state it was cancelled from, or the refusal.
        ``cascade``: its descendants are to be cancelled too (the gates do it).
        ``parent_id``: cancelled because its parent ``parent_id`` was, with cascade
        (reason parent_cancelled; a job already ended is only marked, and the
        refusal names its state)."""
        keys = [*job_keys(part), part.job(job_id), part.deps(job_id), part.spec(job_id),
                part.cascaded(job_id)]
        args = [actor, job_id, part.agent, "1" if is_system else "0", part.cancel_notices,
                "1" if cascade or parent_id else "0", parent_id]
        reply = await self._call("cancel", keys, args)
        return str(reply[1]) if reply[0] == "ok" else Refusal(reply[0], tuple(reply[1:]))

    async def approve(
        self, part: Partition, actor: str, job_id: str, note: str | None, *, allowed: bool
    ) -> Refusal | str:
        """Approve a job pending approval; returns the state it moved to (queued,
        delayed, waiting_dependencies, or failed when a dependency failed meanwhile)."""
        keys = [*job_keys(part), part.job(job_id), part.deps(job_id)]
        args = [actor, job_id, "1" if allowed else "0", "" if note is None else note]
        reply = await self._call("approve", keys, args)
        return str(reply[1]) if reply[0] == "ok" else Refusal(reply[0], tuple(reply[1:]))

    async def reject(
        self, part: Partition, actor: str, job_id: str, reason: str | None, *, allowed: bool
    ) -> Refusal | None:
        """Reject a job pending approval: it is cancelled."""
        keys = [*job_keys(part), part.job(job_id), part.deps(job_id)]
        args = [actor, job_id, "1" if allowed else "0", "" if reason is None else reason]
        reply = await self._call("reject", keys, args)
        return None if reply[0] == "ok" else Refusal(reply[0], tuple(reply[1:]))

    async def adopt(self, parent_part: Partition, parent_id: str, child_id: str) -> str:
        """In the parent's partition: add ``child_id`` to ``parent_id``'s children.
        Returns "added", "cancel" (the parent was cancelled with cascade: cancel the
        child) or "missing" (no such parent in Redis)."""
        call = self.adopt_call(parent_part, parent_id, child_id)
        reply = await self._call(call.name, call.keys, call.args)
        return str(reply[0])

    @staticmethod
    def adopt_call(parent_part: Partition, parent_id: str, child_id: str) -> ScriptCall:
        """:meth:`adopt` as a call for :meth:`call_many` (the reply's first item is
        its answer)."""
        keys = [parent_part.job(parent_id), parent_part.children(parent_id),
                parent_part.cascaded(parent_id)]
        return ScriptCall("adopt", keys, [child_id])

    async def drain(
        self, part: Partition, actor: str, candidates: Sequence[tuple[str, str]]
    ) -> list[str]:
        """Cancel those of ``candidates`` ``(job id, '<code> <entry id>' or '')`` still
        queued or delayed; returns the ids drained."""
        keys = job_keys(part) + [part.job(job_id) for job_id, _ in candidates]
        args: list[Any] = [actor, len(candidates)]
        for candidate in candidates:
            args += candidate
        return list(await self._call("drain", keys, args))

    async def promote(
        self, part: Partition, actor: str, job_ids: Sequence[str]
    ) -> tuple[list[str], int | None]:
        """Queue those of ``job_ids`` that are due; returns them and the next run time (ms)."""
        keys = job_keys(part) + [part.job(job_id) for job_id in job_ids]
        reply = await self._call("promote", keys, [actor, len(job_ids), *job_ids])
        timed = Timed.of(reply)
        return timed.ids, timed.next_ms

    async def promote_due(self, part: Partition, actor: str, limit: int) -> Timed:
        """Queue up to ``limit`` jobs due by the server's clock (the script finds
        them); returns them, the next run time and Redis's time."""
        args = [actor, "due", part.job_prefix, limit]
        return Timed.of(await self._call("promote", job_keys(part), args))

    # -- schedules -----------------------------------------------------------

    async def schedule(
        self, part: Partition, op: Literal["add", "remove", "pause", "resume"], name: str,
        actor: str, data: bytes, *, ring: str, next_ms: int | None = None,
        definition: bytes = b"",
    ) -> Refusal | int:
        """Change schedule ``name`` of ``part`` and append its event (``data``, the
        event's JSON); returns the server's time (ms), or the refusal (``exists``,
        ``not_found``, ``invalid_state``). ``ring``: the doorbell's channel."""
        keys = [part.schedules, part.schedule_next, part.schedule_last, part.schedule_log]
        args: list[Any] = [op, name, actor, data, "" if next_ms is None else next_ms,
                           definition, ring, part.agent]
        reply = await self._call("schedule", keys, args)
        return int(reply[1]) if reply[0] == "ok" else Refusal(reply[0], tuple(reply[1:]))

    @staticmethod
    def schedule_due_call(part: Partition, limit: int) -> ScriptCall:
        """The schedules of ``part`` whose tick has come (decode with
        :meth:`ScheduleDue.of`)."""
        return ScriptCall("schedule_due", [part.schedules, part.schedule_next], [limit])

    async def schedule_due(self, part: Partition, limit: int) -> ScheduleDue:
        call = self.schedule_due_call(part, limit)
        return ScheduleDue.of(await self._call(call.name, call.keys, call.args))

    async def schedule_name(
        self, keys: Keys, op: Literal["claim", "take", "release"], name: str, target: str,
        held: str = "",
    ) -> Any:
        """The global index of schedule names (``schedule_name.lua``)."""
        return await self._call("schedule_name", [keys.schedules], [op, name, target, held])

    async def schedule_tick(self, part: Partition, name: str, tick_ms: int,
                            next_ms: int | None, outcome: str) -> bool:
        """Move schedule ``name`` past ``tick_ms`` to ``next_ms`` (None: it fires no
        more), only if ``tick_ms`` is still its next tick; whether it moved."""
        keys = [part.schedule_next, part.schedule_last]
        args = [name, tick_ms, "" if next_ms is None else next_ms, outcome]
        return bool(await self._call("schedule_tick", keys, args))

    # -- dependencies ------------------------------------------------------

    async def register(
        self, dep_part: Partition, dep_id: str, dependent_id: str
    ) -> tuple[str, str, str, str] | None:
        """Register ``dependent_id`` with dependency ``dep_id``. None when registered;
        else ("ended", state, result JSON or "", error or "") or ("missing", …)."""
        keys = [dep_part.job(dep_id), dep_part.dependents(dep_id), dep_part.result(dep_id)]
        reply = await self._call("register", keys, [dependent_id])
        if reply[0] == "registered":
            return None
        padded = [*reply, "", "", ""]
        return (padded[0], padded[1], padded[2], padded[3])

    async def resolve(
        self, part: Partition, actor: str, job_id: str, dep_id: str, dep_state: str,
        dep_result: str, dep_error: str, *, ignore_failure: bool,
    ) -> str:
        """Resolve one dependency of a waiting job; returns what happened:
        seen (already), resolved, queued, delayed or failed."""
        call = self.resolve_call(part, actor, job_id, dep_id, dep_state, dep_result, dep_error,
                                 ignore_failure=ignore_failure)
        reply = await self._call(call.name, call.keys, call.args)
        return str(reply[0])

    @staticmethod
    def resolve_call(
        part: Partition, actor: str, job_id: str, dep_id: str, dep_state: str,
        dep_result: str, dep_error: str, *, ignore_failure: bool,
    ) -> ScriptCall:
        """:meth:`resolve` as a call for :meth:`call_many` (its reply's first item
        says what happened)."""
        keys = [*job_keys(part), part.job(job_id), part.deps(job_id)]
        args = [actor, job_id, dep_id, dep_state, dep_result, dep_error,
                "1" if ignore_failure else "0"]
        return ScriptCall("resolve", keys, args)

    async def endings(
        self, part: Partition, job_ids: Sequence[str]
    ) -> dict[str, tuple[str, str, str, list[str]]]:
        """Of jobs of ``part`` that just ended, those with dependents or an announce:
        job id -> (result JSON or "", error or "", spec JSON, dependents)."""
        args = [part.job_prefix, part.dependents(""), " ".join(job_ids), part.spec_prefix,
                part.result_prefix]
        reply = await self._call("endings", [part.log], args)
        return {r[0]: (r[1], r[2], r[3], sorted(r[4])) for r in reply}

    async def rearm(
        self, part: Partition, actor: str, job_id: str, dep_id: str, open_deps: Sequence[str] = ()
    ) -> bool:
        """Return a job failed by ``dep_id`` to waiting for it and for ``open_deps``
        (its other dependencies that have not completed); False when it was not."""
        keys = [*job_keys(part), part.job(job_id), part.deps(job_id)]
        reply = await self._call("rearm", keys, [actor, job_id, dep_id, *open_deps])
        return bool(reply[0] == "rearmed")

    # -- projections -------------------------------------------------------

    async def project(
        self, part: Partition, events: Sequence[tuple[str, str, str, str, int, str | None]],
        *, follows: str = "", views: Partition | None = None, types: Sequence[str] = (),
    ) -> int:
        """Apply ``(event id, job id, state after or "", states it may leave (comma-
        separated, "" for none, "*" for any), at µs, dispatcher or None)`` to the
        partition's views (those of ``views`` when given: a rebuild's), skipping
        what was applied; returns how many were new, or -1 when refused because
        the batch does not follow the position (nothing applied). ``follows``:
        the event the batch directly follows in the log, when it was read so;
        else the script looks for a gap in the log itself. ``types``: the events'
        types, counted per type in the views' hash (``n:<type>``) when given."""
        call = self.project_call(part, events, follows=follows, views=views, types=types)
        return int(await self._call(call.name, call.keys, call.args))

    @staticmethod
    def project_call(
        part: Partition, events: Sequence[tuple[str, str, str, str, int, str | None]],
        *, follows: str = "", views: Partition | None = None, types: Sequence[str] = (),
    ) -> ScriptCall:
        """:meth:`project` as a call for :meth:`call_many` (reply: as ``project``'s)."""
        views = views or part
        keys = [views.projection, part.log, *(views.index_state(s) for s in STATES)]
        dispatchers: dict[str, int] = {}
        lines = []
        for event_id, job_id, state, came_from, at, dispatcher in events:
            by = 0
            if dispatcher:
                by = dispatchers.setdefault(dispatcher, len(dispatchers) + 1)
            lines.append(f"{event_id} {job_id} {state or '-'} {came_from or '-'} {at} {by}")
        keys += [views.index_by(d) for d in dispatchers]
        return ScriptCall("project", keys, ["\n".join(lines), follows, " ".join(types)])

    async def history(
        self, part: Partition, at: str, count: int
    ) -> tuple[list[tuple[str, list[str]]], str]:
        """Up to ``count`` of a job's events, newest first, back along their chain
        from event ``at`` (or an old record's list of ids); and where to go on
        ("" when the chain ended). Each event is its id and its names and values,
        flat, in the order ``aq_event`` writes them: ``type jobId v at actor data
        p``, then ``q`` when set (so a value is found at its place: ``type`` at 1,
        ``data`` at 11)."""
        flat, after = await self._call("history", [part.log], [at, count])
        return await self._history_entries(part, flat), str(after)

    async def histories(self, part: Partition, ats: Sequence[str], count: int
                        ) -> list[tuple[list[tuple[str, list[str]]], str]]:
        """:meth:`history` of many jobs (from each of ``ats``, up to ``count`` events
        each), each event read alone (jobs whose events lie far apart): the jobs
        :data:`_HISTORIES_PER_CALL` to a script call, the calls in one round trip."""
        calls = [ScriptCall("history", [part.log],
                            [ats[start], count, 1, *ats[start + 1 : start + _HISTORIES_PER_CALL]])
                 for start in range(0, len(ats), _HISTORIES_PER_CALL)]
        flat = [item for reply in await self.call_many(calls) for item in reply]
        return [(await self._history_entries(part, entries), str(after))
                for entries, after in zip(flat[0::2], flat[1::2], strict=True)]

    async def _history_entries(self, part: Partition, flat: Sequence[Any]
                               ) -> list[tuple[str, list[str]]]:
        entries: list[tuple[str, list[str]]] = []
        for i in range(0, len(flat), 3):
            # history.lua joins an entry's names and values with 0x1f.
            entry_id, size, fields = flat[i], flat[i + 1], flat[i + 2].split("\x1f")
            if len(fields) == size:
                entries.append((entry_id, fields))
            else:  # a value held 0x1f itself: read the entry by itself
                alone: list[tuple[str, dict[str, str]]] = await self.redis.xrange(  # type: ignore[assignment]
                    part.log, entry_id, entry_id)
                entries += [(entry_id, _in_order(found)) for entry_id, found in alone]
        return entries

    async def swap(self, pairs: Sequence[tuple[str, str]], stale: Sequence[str]) -> None:
        """In one step: put each ``(rebuilt view, live view)`` in place of the live
        one (a rebuilt view never written empties it) and delete the ``stale``
        views; a view is a key or a paged index (all its keys). All of one
        partition."""
        keys = [rebuilt for rebuilt, _ in pairs] + [live for _, live in pairs] + list(stale)
        await self._call("swap", keys, [len(pairs)])

    @staticmethod
    def index_call(keys: Keys, jobs: Sequence[tuple[str, str]], stage: str = "") -> ScriptCall:
        """Add ``(job id, dispatcher)`` pairs to the global job indexes, in the global
        area's slot (reply: how many were new). Send it with the dispatch calls
        that make the jobs (:meth:`call_many`). ``stage``: a rebuild's copies."""
        return ScriptCall("index", *_global_index_args(keys, jobs, stage))

    # -- paged indexes (``_lib.lua``: pages of at most 128 ids under a directory) --

    @staticmethod
    def index_range_call(index: str, after: str | None, count: int, *, forward: bool
                         ) -> ScriptCall:
        """Read up to ``count`` ids of a paged ``index`` past ``after`` (exclusive;
        None: from its start), forward (smallest first) or back (greatest first);
        the reply goes through :meth:`index_range_ids`."""
        bound = f"({after}" if after is not None else ("-" if forward else "+")
        return ScriptCall("index_range", [index], [bound, count, "1" if forward else "0"])

    @staticmethod
    def index_range_ids(reply: Sequence[Sequence[str]], count: int, *, forward: bool
                        ) -> list[str]:
        """The ids an ``index_range_call`` read: its pages' and a legacy index's
        (one sorted set kept by a version before) merged, in order."""
        found, legacy = reply
        if not legacy:
            return list(found)
        return sorted(set(found) | set(legacy), reverse=not forward)[:count]

    async def index_range(self, index: str, after: str | None, count: int, *, forward: bool
                          ) -> list[str]:
        """Up to ``count`` ids of a paged ``index`` past ``after`` (see
        :meth:`index_range_call`)."""
        call = self.index_range_call(index, after, count, forward=forward)
        reply = await self._call(call.name, call.keys, call.args)
        return self.index_range_ids(reply, count, forward=forward)

    @staticmethod
    def index_has_call(index: str, ids: Sequence[str]) -> ScriptCall:
        """Ask whether a paged ``index`` holds each of ``ids`` (some); the reply is
        one character per id, '1' when held."""
        return ScriptCall("index_has", [index], [" ".join(ids)])  # any order

    async def index_has(self, index: str, ids: Sequence[str]) -> list[bool]:
        """Whether a paged ``index`` holds each of ``ids``."""
        if not ids:
            return []
        call = self.index_has_call(index, ids)
        held: str = await self._call(call.name, call.keys, call.args)
        return [flag == "1" for flag in held]

    async def index_size(self, index: str) -> int:
        """How many ids a paged ``index`` holds."""
        return int(await self._call("index_size", [index], []))

    @staticmethod
    def index_both_call(first: str, second: str, after: str | None, count: int, budget: int
                        ) -> ScriptCall:
        """Read up to ``count`` of the ids both ``first`` and ``second`` hold (two
        indexes of one partition), greatest first, below ``after`` (None: from the
        end), looking at no more than ``budget``; the reply is the ids, the last id
        looked at and whether the walk ended, or -1 when either is a paged index
        that a version before kept whole (read ``first`` and sift instead)."""
        bound = f"({after}" if after else "+"
        return ScriptCall("index_both", [first, second],
                          [bound, count, budget, "1" if is_paged(first) else "0",
                           "1" if is_paged(second) else "0"])

    @staticmethod
    def index_edit_call(index: str, ids: Sequence[str], *, add: bool) -> ScriptCall:
        """Add ``ids`` to a paged ``index`` or take them out (reply: how many
        changed); sent in id order, which fills pages from the end."""
        return ScriptCall("index_edit", [index], ["+" if add else "-", " ".join(sorted(ids))])

    async def index_edit(self, index: str, ids: Sequence[str], *, add: bool) -> int:
        """Add ``ids`` to a paged ``index`` or take them out; how many changed."""
        if not ids:
            return 0
        call = self.index_edit_call(index, ids, add=add)
        return int(await self._call(call.name, call.keys, call.args))

    async def records(self, part: Partition, job_ids: Sequence[str]) -> list[dict[str, str]]:
        """The state records of ``part``'s jobs ``job_ids``, each with its ``spec``
        and long ``result`` (``{}`` for a job that does not exist), in one call (``records.lua``):
        what :func:`reader.read_records` reads, for many jobs of one partition."""
        call = self.records_call(part, job_ids)
        return self.records_of(await self._call(call.name, call.keys, call.args))

    async def created_by(self, part: Partition, bound_ms: int,
                         job_ids: Sequence[str]) -> list[str]:
        """Those of ``part``'s jobs ``job_ids`` dispatched no later than ``bound_ms``
        by the server's clock (their records' ``createdAt``), in one call
        (``created.lua``): a job with no record is left out, one whose ``createdAt``
        is no number kept."""
        reply = await self._call("created", [part.log],
                                 [part.job_prefix, bound_ms, " ".join(job_ids)])
        return [str(job_id) for job_id in reply]

    @staticmethod
    def records_call(part: Partition, job_ids: Sequence[str]) -> ScriptCall:
        """:meth:`records` as a call to send with others (its reply: :meth:`records_of`)."""
        return ScriptCall("records", [part.log], [part.job_prefix, part.spec_prefix,
                                                  " ".join(job_ids), part.result_prefix])

    @staticmethod
    def records_of(reply: list[Any]) -> list[dict[str, str]]:
        """The records ``records.lua`` replied."""
        return [with_kept_apart(dict(zip(flat[0::2], flat[1::2], strict=True)), spec, result)
                for flat, spec, result in zip(reply[0::3], reply[1::3], reply[2::3],
                                              strict=True)]

    @staticmethod
    def unindex_call(keys: Keys, jobs: Sequence[tuple[str, str]]) -> ScriptCall:
        """Take ``(job id, dispatcher)`` pairs out of the global job indexes (reply:
        how many left the index of every job); ``index_call``'s counterpart."""
        return ScriptCall("unindex", *_global_index_args(keys, jobs))

    async def record(self, part: Partition, ended: Mapping[str, int],
                     end: tuple[str, str, int] | None = None) -> None:
        """Push the jobs that ended in what was just archived (job id -> end, ms, in
        log order) onto ``part.ended`` and, with ``end`` (the archive's last event
        id, "" for none; its chain's head; its seq), write where the archive ends,
        in one step (``record.lua``)."""
        args: list[Any] = [" ".join(f"{ms} {job_id}" for job_id, ms in ended.items())]
        if end is not None:
            args += list(end)
        await self._call("record", [part.ended, part.archive], args)

    @staticmethod
    def metrics_call(part: Partition) -> ScriptCall:
        """Read what ``/metrics`` shows of one partition, in one step (reads only):
        the reply is the counts hash's pairs, the live workers, the projection
        hash's pairs (``consumers/metrics.py``)."""
        return ScriptCall("metrics", [part.counts, part.projection, part.workers], [])

    @staticmethod
    def activity_call(part: Partition) -> ScriptCall:
        """Read what ``activity`` shows of one partition, in one step (reads only;
        decode the reply with :meth:`activity_outcome`)."""
        return ScriptCall("activity", [part.counts], [part.base])

    @staticmethod
    def activity_outcome(reply: Sequence[Any]) -> PartitionActivity:
        counts, workers, last_at, ids, specs = reply
        return PartitionActivity(
            {name: int(n) for name, n in _pairs(counts).items()}, int(workers),
            int(last_at) if last_at else None, list(zip(ids, specs, strict=True)))

    # -- admission ---------------------------------------------------------

    async def take_rate(
        self, part: Partition, limit: int, count: int, token: str, window_ms: int = 60_000,
        hold_ms: int = 5_000,
    ) -> tuple[Literal["taken", "refused", "busy"], int]:
        """Take ``count`` dispatches from the caller's window: (outcome, dispatches
        already in it). "busy": full, but with places of dispatches still in flight."""
        keys = [part.rate, part.rate_pending]
        reply = await self._call("rate", keys, [limit, count, token, window_ms, hold_ms])
        outcome = {1: "taken", 0: "refused", 2: "busy"}[int(reply[0])]
        return outcome, int(reply[1])  # type: ignore[return-value]

    async def settle_rate(self, part: Partition, token: str, taken: int, used: int) -> None:
        """Settle places taken with ``token``: the first ``used`` were dispatched, the
        rest are given back."""
        members = [f"{token}:{i}" for i in range(1, taken + 1)]
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrem(part.rate_pending, *members)
            if used < taken:
                pipe.zrem(part.rate, *members[used:])
            await pipe.execute()
