"""Every Redis key agentq uses, built in one place.

A partition's keys share the hash tag ``{<agent>}`` so that every script, which
only ever touches one partition, runs in one cluster slot. The global area (the
agent registry, the list of partitions ever made) lives under ``{<prefix>}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from agentq.schemas.job import TERMINAL_STATES, Priority

PRIORITY_CODES: Final[dict[str, str]] = {"high": "h", "normal": "n", "low": "l"}
PRIORITY_ORDER: Final[tuple[Priority, ...]] = ("high", "normal", "low")

# Consumer groups on a partition's streams.
WORKERS_GROUP: Final = "workers"


# A paged index (``_lib.lua``) named ``<index>`` is kept in keys named from it
# with this mark, which no agent or dispatcher name holds.
PAGED_MARK: Final = "#"


def index_directory(index: str) -> str:
    """Sorted set: the start of each page of the paged index ``index`` (the first
    page's is ''). A paged index holds job ids in id order, at most 128 a page
    and no more than fill a listpack of 4 KiB (``index_page``, ``_lib.lua``'s
    ``aq_page_cap``): about 36 bytes an id, a third of one large sorted set's.
    ``index`` itself names no key, but one kept whole by a version before, which
    readers merge and writers move into pages."""
    return f"{index}{PAGED_MARK}"


def index_page(index: str, start: str) -> str:
    """Sorted set (all scores 0): the ids of the paged ``index`` from ``start`` on,
    up to the next page's start."""
    return f"{index}{PAGED_MARK}p{start}"


# The partition indexes kept paged: those that hold every job of the window
# (each dispatcher's, and the terminal states'). The five states a job passes
# through stay single sorted sets: they hold the jobs in flight, and change at
# every step of every job, where a page costs a look at its directory.
PAGED_STATES: Final = TERMINAL_STATES


def is_paged(index: str) -> bool:
    """Whether the index named ``index`` is paged (``index_directory``): the
    global job indexes, a partition's dispatcher indexes and its terminal
    states' (live or a rebuild's)."""
    _, mark, tail = index.rpartition(":idx:")
    if mark:
        kind, _, name = tail.partition(":")
        return kind == "by" or (kind == "state" and name in PAGED_STATES)
    return index.endswith(":jobs") or ":jobs:by:" in index


def index_of_key(key: str) -> str:
    """The paged index a key belongs to: its directory, a page, or itself."""
    return key.split(PAGED_MARK, 1)[0]


@dataclass(frozen=True, slots=True)
class Partition:
    """The keys of one agent's partition."""

    prefix: str
    agent: str
    # A second set of the partition's keys beside the live one (a rebuild's
    # staging area): "<prefix>:{<agent>}:<stage>:…", same hash tag, same slot.
    stage: str = ""

    @property
    def base(self) -> str:
        tagged = f"{self.prefix}:{{{self.agent}}}"
        return f"{tagged}:{self.stage}" if self.stage else tagged

    @property
    def meta(self) -> str:
        """Hash: the agent's registration (exists iff the agent is known)."""
        return f"{self.base}:meta"

    @property
    def log(self) -> str:
        """Stream: every event of every job targeting the agent."""
        return f"{self.base}:log"

    def ready(self, priority: str) -> str:
        """Stream of ready jobs of one priority; consumer group ``workers``."""
        return f"{self.base}:ready:{PRIORITY_CODES[priority]}"

    @property
    def ready_streams(self) -> tuple[str, str, str]:
        """The ready streams, high priority first."""
        return (self.ready("high"), self.ready("normal"), self.ready("low"))

    def job(self, job_id: str) -> str:
        """Hash: the job's state record."""
        return f"{self.job_prefix}{job_id}"

    @property
    def job_prefix(self) -> str:
        """What every job record key of the partition starts with."""
        return f"{self.base}:job:"

    def spec(self, job_id: str) -> str:
        """String: the job's spec, its dispatch fields as JSON (never changes). Kept
        apart from the record so that the record stays small enough for Redis to
        store compactly."""
        return f"{self.spec_prefix}{job_id}"

    @property
    def spec_prefix(self) -> str:
        """What every spec key of the partition starts with."""
        return f"{self.base}:spec:"

    def result(self, job_id: str) -> str:
        """String: a completed job's result (JSON) when the log holds it by reference
        (longer than ``PAYLOAD_INLINE_MAX``): kept apart, as the spec is, so that
        the record stays a listpack (a value over 64 bytes would make it a hash
        table, about as large again as the result); the record's ``longResult``
        field says it is here. A shorter result stays in the record's ``result``."""
        return f"{self.result_prefix}{job_id}"

    @property
    def result_prefix(self) -> str:
        """What every result key of the partition starts with."""
        return f"{self.base}:res:"

    @property
    def delayed(self) -> str:
        """Sorted set: run time (ms) -> job id."""
        return f"{self.base}:delayed"

    @property
    def timers(self) -> str:
        """Stream (one entry): touched whenever a job is delayed, to wake schedulers."""
        return f"{self.base}:timers"

    @property
    def leases(self) -> str:
        """Sorted set: lease deadline (ms) -> active job id."""
        return f"{self.base}:leases"

    @property
    def active(self) -> str:
        """Hash: active job id -> '<priority code> <worker id>'."""
        return f"{self.base}:active"

    def deps(self, job_id: str) -> str:
        """Set: unresolved dependencies of a waiting job."""
        return f"{self.base}:deps:{job_id}"

    def dependents(self, job_id: str) -> str:
        """Set: jobs (of any agent) waiting on job ``job_id``."""
        return f"{self.base}:dependents:{job_id}"

    def children(self, job_id: str) -> str:
        """Set: jobs (of any agent) dispatched from inside job ``job_id`` (their
        ``parentJobId``), added by the gates when they see each child's dispatch."""
        return f"{self.base}:children:{job_id}"

    def cascaded(self, job_id: str) -> str:
        """String: set when job ``job_id`` was cancelled with ``cascade`` (or reached by
        an ancestor's): a child whose dispatch the gates see later is cancelled."""
        return f"{self.base}:cascaded:{job_id}"

    def idempotency(self, caller: str, key: str) -> str:
        """String with a TTL: the job id first dispatched by ``caller`` with ``key``."""
        return f"{self.base}:idem:{caller}:{key}"

    @property
    def no_idempotency(self) -> str:
        """A key of the partition that is never written; stands in when a job has no key."""
        return f"{self.base}:idem:-"

    @property
    def counts(self) -> str:
        """Hash: jobs per state."""
        return f"{self.base}:counts"

    @property
    def rate(self) -> str:
        """Sorted set: this agent's dispatches, as a caller, in the rolling window."""
        return f"{self.base}:rate"

    @property
    def rate_pending(self) -> str:
        """Sorted set: places of ``rate`` taken by dispatches still in flight."""
        return f"{self.base}:rate:pending"

    @property
    def projection(self) -> str:
        """Hash: the projector's position in the log (``pos``) and ``lastActivityAt``."""
        return f"{self.base}:proj"

    @property
    def index_all(self) -> str:
        """Sorted set: every job of the partition, as a version before kept it. No
        longer written (the state indexes' union is every job); ``expire.lua`` still
        takes removed jobs out of it, and a rebuild deletes it."""
        return f"{self.base}:idx:all"

    def index_by(self, dispatcher: str) -> str:
        """Paged index (``index_directory``; job ids in id order): the partition's
        jobs dispatched by ``dispatcher``."""
        return f"{self.base}:idx:by:{dispatcher}"

    def index_state(self, state: str) -> str:
        """The partition's jobs in ``state``, in id order: a paged index for a
        terminal state (``PAGED_STATES``), else a sorted set (all scores 0). Every
        job is in exactly one: their union is every job of the partition."""
        return f"{self.base}:idx:state:{state}"

    def alerted(self, event_id: str) -> str:
        """String with a TTL: the alert for failure event ``event_id`` was sent."""
        return f"{self.base}:alerted:{event_id}"

    @property
    def workers(self) -> str:
        """Sorted set: live worker id -> heartbeat deadline (ms)."""
        return f"{self.base}:workers"

    @property
    def archive(self) -> str:
        """Hash: where the partition's archive ends, as the archiving pass last
        recorded it after the manifest: ``last`` (the last archived event id),
        ``head`` (that segment's SHA-256, the chain's head) and ``seq``. The log is
        never trimmed past ``last``; the manifest wins when the two disagree."""
        return f"{self.base}:archive"

    @property
    def archive_lock(self) -> str:
        """String with a TTL: held by the one process archiving the partition now."""
        return f"{self.base}:archive:lock"

    @property
    def ended(self) -> str:
        """List: '<end ms> <job id>' of the jobs whose terminal event is archived, in
        the order archived (``record.lua``); ``expire.lua`` removes them from Redis
        once ``jobsSeconds`` passed. (A sorted set, job id -> end, before.)"""
        return f"{self.base}:ended"

    @property
    def expired(self) -> str:
        """Hash: per batch ``expire.lua`` removed from the partition (its first job
        id), '<job id> <dispatcher>' lines: jobs whose entries in the global job
        indexes are still to be removed (``scripts.expired_jobs`` reads it)."""
        return f"{self.base}:expired"

    @property
    def schedules(self) -> str:
        """Hash: schedule name -> its definition JSON (cron, zone, the job it dispatches),
        for the schedules that target this agent."""
        return f"{self.base}:schedules"

    @property
    def schedule_next(self) -> str:
        """Sorted set: schedule name -> its next tick (ms); only schedules not paused.
        The scheduler wakes at its head, judged by Redis ``TIME``."""
        return f"{self.base}:schedules:next"

    @property
    def schedule_last(self) -> str:
        """Hash: schedule name -> '<tick ms> <job id or !refusal>', its last tick."""
        return f"{self.base}:schedules:last"

    @property
    def schedule_log(self) -> str:
        """Stream: ScheduleAdded, ScheduleRemoved, SchedulePaused, ScheduleResumed of the
        schedules that target this agent (apart from ``log``, which holds job events)."""
        return f"{self.base}:schedules:log"

    @property
    def cancel_notices(self) -> str:
        """Pub/sub channel (not a key): the id of each active job just cancelled,
        published by the cancel script so that the job's worker stops it at once."""
        return f"{self.base}:notices:cancel"


def rebuilding(part: Partition) -> Partition:
    """``part``'s keys under a rebuild's prefix, same hash tag (so same slot):
    ``projections rebuild`` builds the views there, then swaps them in."""
    return Partition(part.prefix, part.agent, "rebuild")


@dataclass(frozen=True, slots=True)
class Keys:
    """Key builder for one key prefix."""

    prefix: str = "aq"

    def partition(self, agent: str) -> Partition:
        return Partition(self.prefix, agent)

    @property
    def agents(self) -> str:
        """Hash: known agent id -> its registration JSON."""
        return f"{self.prefix}:{{{self.prefix}}}:agents"

    @property
    def partitions(self) -> str:
        """Set: every agent that ever had a partition (for replay and audit)."""
        return f"{self.prefix}:{{{self.prefix}}}:partitions"

    @property
    def tokens(self) -> str:
        """Hash: SHA-256 (hex) of a bearer token -> its entry as JSON (agent, prefix,
        createdAt); ``eventlog/tokens.py`` reads and writes it. Never the token."""
        return f"{self.prefix}:{{{self.prefix}}}:tokens"

    @property
    def processes(self) -> str:
        """Sorted set: every ``worker``/``run`` process (its consumer name) -> heartbeat
        deadline (ms, by Redis TIME). Past it, the process is dead: its pending
        entries are taken over at once and its consumers removed from the groups."""
        return f"{self.prefix}:{{{self.prefix}}}:processes"

    @property
    def owners(self) -> str:
        """Hash: shard -> the process (consumer name) that serves its partitions'
        background work; a lease valid while that process's deadline in
        ``processes`` (same slot) has not passed. Fields ``@<name>`` list the
        processes that take leases."""
        return f"{self.prefix}:{{{self.prefix}}}:owners"

    @property
    def ring(self) -> str:
        """Pub/sub channel (not a key): the doorbell. Every script that appends to a
        partition's log publishes the agent's id here once per call
        (``_lib.lua``'s ``aq_ring``, which reads the prefix off the log's key, so
        the two must agree), and ``owners.lua`` publishes ``!owners`` when leases
        change hands."""
        return f"{self.prefix}:ring"

    @property
    def schedules(self) -> str:
        """Hash: schedule name -> '<target> <ms claimed>': which partition holds each
        schedule (names are unique across agents). An index of the partitions'
        ``schedules`` hashes, written before them; an entry whose partition has no
        such schedule is a stray (an add cut short) and is taken over."""
        return f"{self.prefix}:{{{self.prefix}}}:schedules"

    def jobs_index(self, stage: str = "") -> str:
        """Paged index (see :func:`index_directory`; job ids in id order): every job of
        every partition, for ``list`` across agents. An index rebuildable from the
        partitions, written beside each dispatch; a member without a record (a
        refused dispatch) is skipped by readers. ``stage``: a rebuild's copy."""
        return f"{self.prefix}:{{{self.prefix}}}:{stage + ':' if stage else ''}jobs"

    def jobs_by(self, dispatcher: str, stage: str = "") -> str:
        """Paged index like ``jobs_index``: the jobs ``dispatcher`` dispatched, any target."""
        return f"{self.jobs_index(stage)}:by:{dispatcher}"

    @property
    def jobs_built(self) -> str:
        """String: set once the global job indexes hold every job made before it (a
        rebuild, or the first list across agents after an upgrade from a version
        without them, built them from the partitions)."""
        return f"{self.jobs_index()}:built"
