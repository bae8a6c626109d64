"""The cluster client: redis-py's ``RedisCluster`` with agentq's guarantees.

* **Routing.** A command goes to the master that owns its key's slot
  (redis-py). ``XREAD`` and ``XREADGROUP`` are routed by their first stream
  here: redis-py would ask a node which keys they name (``COMMAND GETKEYS``),
  a round trip before every blocking read. A partition's streams share its
  slot, so a read of one partition is one node's.
* **Batches** (:meth:`ClusterClient.send_by_node`, under both
  ``Scripts.call_many`` and every plain pipeline): commands are grouped by
  the node that owns their slot, one pipeline per node on one of its
  connections, all nodes at once; replies come back in order. redis-py's own
  cluster pipeline refuses ``EVALSHA`` and cannot put a ``WAIT`` on the
  connection of the writes it should confirm.
* **Redirects and failovers are ridden out.** An error that proves the
  command did not run (``MOVED``/``ASK`` while a slot moves, ``TRYAGAIN``,
  ``CLUSTERDOWN``, a slot no node serves, a node that refuses connections) is
  retried: at once after a redirect (the slot map corrected), else after a
  pause (0.05 s doubling to 1 s) with the slot map read again, for up to
  :data:`RIDE_OUT_SECONDS`. An error after which the command may have run (a
  connection lost while waiting for its reply) is retried for a read only: a
  script is never run twice by the client.
* **The breaker** (one per process) still refuses every call at once while
  open, but on a cluster it counts a failed *call*, once, when the call gives
  up, not each refused connection of the retries: a failover of a few seconds
  must not open it, and other nodes' successes do not hide a dead one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from redis.asyncio.cluster import (
    ClusterNode,
    ClusterPipeline,
    ClusterPubSub,
    PipelineCommand,
    RedisCluster,
)
from redis.commands.cluster import READ_COMMANDS
from redis.exceptions import (
    AskError,
    BusyLoadingError,
    ClusterDownError,
    ClusterError,
    MaxConnectionsError,
    MovedError,
    RedisClusterException,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from agentq.eventlog.breaker import BREAKER, CircuitOpen, is_auth_error, unsent

log = structlog.get_logger("agentq.connection")

RIDE_OUT_SECONDS = 10.0
"""How long a call keeps retrying a cluster that does not take it: a failover
(the master's ``cluster-node-timeout`` plus an election, a few seconds) or a
slot being moved. Past it the call fails with ``unavailable``."""

_PAUSE_FIRST, _PAUSE_MAX = 0.05, 1.0
_NOTE_EVERY = 5.0  # seconds between two warnings that calls are being retried

# Replies that say the command was not run and the cluster is changing (and no
# free connection, raised before anything was sent).
_NOT_RUN = (ClusterDownError, TryAgainError, AskError, SlotNotCoveredError, BusyLoadingError,
            MaxConnectionsError)
# Replies of a master that just became a replica: a blocked read it let go
# (UNBLOCKED), a write it refused (READONLY). Neither ran.
_REFUSED_BY_A_REPLICA = ("UNBLOCKED", "READONLY")
# What redis-py raises when its cluster view cannot be built (a node list to
# try again), as opposed to a command it cannot route (a programming error).
_UNREACHED = ("Redis Cluster cannot be connected", "All slots are not covered")

# Commands without a key, sent in a batch to the node of the batch's first keyed
# command (else any master): the server's TIME beside a read, say.
_KEYLESS = frozenset({"TIME", "PING", "ECHO"})

Command = tuple[tuple[Any, ...], dict[str, Any]]
"""A command as redis-py's ``execute_command`` takes it: its words and options."""


class ClusterUnavailable(RedisConnectionError):
    """The cluster did not take a command within :data:`RIDE_OUT_SECONDS`, or
    cannot be reached at all; the message says what it answered."""


@dataclass(frozen=True, slots=True)
class NodeReplies:
    """What :meth:`ClusterClient.send_by_node` got back: a reply (or the error)
    per command, in order, and with ``wait``, the fewest replicas any node's
    ``WAIT`` counted (None: no WAIT was asked, or no command ran)."""

    replies: list[Any]
    confirmed: int | None


def describe(error: BaseException) -> str:
    """A cluster error in words a caller can act on (never a bare ``5805 host:port``)."""
    if isinstance(error, ClusterUnavailable):
        return str(error)
    if isinstance(error, MovedError):
        return (f"slot {error.slot_id} moved to {error.host}:{error.port} and the client "
                "could not follow it")
    if isinstance(error, AskError):
        return (f"slot {error.slot_id} is being moved to {error.host}:{error.port} "
                "(ASK) and the client could not follow it")
    if isinstance(error, TryAgainError):
        return "a slot is being moved between nodes (TRYAGAIN)"
    if isinstance(error, ClusterDownError):
        return f"the cluster is down ({error})"
    if isinstance(error, SlotNotCoveredError):
        return f"no node serves the slot ({error})"
    return str(error) or type(error).__name__


def routing_key(args: Sequence[Any]) -> Any | None:
    """The key that decides a command's node, when it is cheaper to find here than
    redis-py's way: a script's first key, a stream read's first stream."""
    name = str(args[0]).upper()
    if name in ("EVALSHA", "EVAL", "EVALSHA_RO", "EVAL_RO"):
        return args[3] if len(args) > 3 and int(args[2]) > 0 else None
    if name in ("XREAD", "XREADGROUP"):
        for index, word in enumerate(args):
            text = word.decode() if isinstance(word, bytes) else word
            if isinstance(text, str) and text.upper() == "STREAMS":
                return args[index + 1] if index + 1 < len(args) else None
    return None


def _blocked_by_breaker(error: BaseException) -> bool:
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, CircuitOpen) or is_auth_error(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _connection_error(error: BaseException) -> bool:
    return isinstance(error, (RedisConnectionError, RedisTimeoutError, OSError))


def _retryable(error: BaseException, *, read: bool) -> bool:
    """Whether ``error`` leaves the command safe to send again, and worth it."""
    if _blocked_by_breaker(error):
        return False
    if isinstance(error, (*_NOT_RUN, ClusterError)):
        return True  # ClusterError: redis-py's redirects ran out ("TTL exhausted")
    if isinstance(error, ResponseError) and str(error).startswith(_REFUSED_BY_A_REPLICA):
        return True
    if isinstance(error, RedisClusterException):
        return str(error).startswith(_UNREACHED)
    if _connection_error(error):
        return read or unsent(error)
    return False


class ClusterClient(RedisCluster):
    """``RedisCluster`` that rides out failovers and resharding (see the module),
    waits for a free connection rather than failing (at most ``max_connections``
    commands in flight, so no node's pool runs out), and sends batches per node."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_flight = asyncio.Semaphore(kwargs.get("max_connections", 100))
        # Once the cluster has answered (its slot map was read), a failure is
        # ridden out; before, a wrong URL fails at once.
        self._reached = False
        # A failure may mean the slots moved: read the map again before the next send.
        self._reread_map = False
        self._noted_at = float("-inf")

    async def initialize(self, *args: Any, **kwargs: Any) -> ClusterClient:
        await super().initialize(*args, **kwargs)
        self._reached = True
        return self

    async def reread_map(self) -> None:
        """Read the slot map again now (a node this client listens to went away)."""
        self._reread_map = True
        await self._ready()

    async def _ready(self) -> None:
        """The slot map, read again after a failure, before routing by it."""
        if self._reread_map:
            await self.nodes_manager.initialize()
            self._reread_map = False
        await self.initialize()

    # -- one command -------------------------------------------------------

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        key = None if "target_nodes" in kwargs else routing_key(args)
        read = str(args[0]).upper() in READ_COMMANDS
        give_up_at: float | None = None
        pause = _PAUSE_FIRST
        while True:
            try:
                if key is not None or give_up_at is not None:
                    await self._ready()
                if key is not None:
                    kwargs["target_nodes"] = self.get_node_from_key(key)
                async with self._in_flight:
                    return await super().execute_command(*args, **kwargs)
            except Exception as exc:
                give_up_at = give_up_at or time.monotonic() + RIDE_OUT_SECONDS
                if not self._reached or not _retryable(exc, read=read) \
                        or time.monotonic() + pause > give_up_at:
                    final = self._gave_up(exc, args[0])
                    if final is exc:
                        raise
                    raise final from exc
                self._note(exc)
                self._reread_map = True
                await asyncio.sleep(pause)
                pause = min(pause * 2, _PAUSE_MAX)

    def _note(self, error: BaseException) -> None:
        """Say (at most every few seconds) that calls are being retried, and why."""
        now = time.monotonic()
        if now - self._noted_at >= _NOTE_EVERY:
            self._noted_at = now
            log.warning("the Redis Cluster is changing or a node does not answer; "
                        f"calls are sent again for up to {RIDE_OUT_SECONDS:g}s",
                        error=describe(error))

    def _gave_up(self, error: Exception, command: Any, *, count: bool = True) -> Exception:
        """What a call that gives up with ``error`` raises, counted once by the breaker
        when the cluster failed it: connection failures and cluster states become
        :class:`ClusterUnavailable`, saying what happened; other errors stay."""
        cluster_state = isinstance(error, (*_NOT_RUN, ClusterError)) or (
            isinstance(error, RedisClusterException) and str(error).startswith(_UNREACHED))
        if isinstance(error, CircuitOpen) or not (cluster_state or _connection_error(error)):
            return error
        if count:
            BREAKER.failed(error)
        if isinstance(error, ClusterUnavailable):
            return error
        name = str(command).upper()
        if not self._reached:
            message = f"the cluster cannot be reached: {describe(error)}"
        elif cluster_state or unsent(error):
            message = f"the cluster did not take {name} within {RIDE_OUT_SECONDS:g}s: " \
                      f"{describe(error)}"
        else:
            message = (f"the connection to a node was lost before {name} was answered "
                       f"(it may have run): {describe(error)}")
        gave_up = ClusterUnavailable(message)
        gave_up._agentq_counted = True  # type: ignore[attr-defined]
        return gave_up

    def pubsub(self, node: ClusterNode | None = None, host: str | None = None,
               port: int | None = None, **kwargs: Any) -> ClusterPubSub:
        """A subscription on the node of its first channel's slot (``PUBLISH``
        reaches every node of a cluster), the slot map read first."""
        return _PubSub(self, node=node, host=host, port=port, **kwargs)

    # -- batches -----------------------------------------------------------

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None
                 ) -> ClusterPipeline:
        """A pipeline sent per node (:class:`NodePipeline`); a transaction (one
        slot only) is redis-py's own."""
        if transaction or shard_hint:
            return super().pipeline(transaction, shard_hint)
        return NodePipeline(self)  # type: ignore[abstract]  # redis-py's stubs, not its class

    async def send_by_node(
        self, commands: Sequence[Command], *, wait: tuple[int, int] | None = None
    ) -> NodeReplies:
        """Send ``commands``: one pipeline per node that owns some of their slots,
        all nodes at once; with ``wait`` (replicas, timeout ms), each node's
        pipeline ends with ``WAIT`` on the same connection. Errors come back in
        place of replies. A command the cluster redirected is sent again where
        it was sent (the slot map corrected, ``ASKING`` first for an ``ASK``), one
        refused for a changing cluster after a pause, within the ride-out time.
        """
        replies: list[Any] = [None] * len(commands)
        pending = list(range(len(commands)))
        asking: dict[int, str] = {}
        confirmed: int | None = None
        give_up_at = time.monotonic() + RIDE_OUT_SECONDS
        pause = _PAUSE_FIRST
        while pending:
            groups = await self._group(commands, pending, asking, replies)
            sends = [self._send_node(node, commands, indexes, asking, replies, wait)
                     for node, indexes in groups.values()]
            # One node (one partition's batch): no task is made.
            waited = [await sends[0]] if len(sends) == 1 else await asyncio.gather(*sends)
            if wait is not None:
                for count in waited:
                    if count is not None:
                        confirmed = count if confirmed is None else min(confirmed, count)
            asking = {}
            again: list[int] = []
            must_pause = False
            for index in pending:
                reply = replies[index]
                if not isinstance(reply, Exception):
                    continue
                if isinstance(reply, MovedError):
                    await self.nodes_manager.move_slot(reply)
                elif isinstance(reply, AskError):
                    asking[index] = f"{reply.host}:{reply.port}"
                elif _retryable(reply, read=str(commands[index][0][0]).upper() in READ_COMMANDS):
                    must_pause = True
                else:
                    continue
                again.append(index)
            if not again:
                break
            if time.monotonic() + (pause if must_pause else 0) > give_up_at:
                break
            if must_pause:
                self._note(replies[again[0]])
                self._reread_map = True
                await asyncio.sleep(pause)
                pause = min(pause * 2, _PAUSE_MAX)
            pending = again
        failed = [i for i, r in enumerate(replies) if isinstance(r, Exception)]
        for index in failed:  # the breaker counts the batch once
            replies[index] = self._gave_up(replies[index], commands[index][0][0],
                                           count=index == failed[0])
        return NodeReplies(replies, confirmed)

    async def _group(
        self, commands: Sequence[Command], pending: Sequence[int], asking: dict[int, str],
        replies: list[Any],
    ) -> dict[str, tuple[ClusterNode, list[int]]]:
        """``pending`` commands by the node to send each to, in order."""
        groups: dict[str, tuple[ClusterNode, list[int]]] = {}
        try:
            await self._ready()
        except Exception as exc:
            # No slot map: every command fails the same way, and may be retried.
            for index in pending:
                replies[index] = exc
            return groups
        keyless: list[int] = []
        for index in pending:
            args, options = commands[index]
            try:
                node = self._node_for(args, options, asking.get(index))
                if node is None:
                    if str(args[0]).upper() in _KEYLESS:
                        keyless.append(index)
                        continue
                    node = (await self.get_nodes_from_slot(*args))[0]
            except Exception as exc:
                replies[index] = exc
                continue
            groups.setdefault(node.name, (node, []))[1].append(index)
        if keyless:
            first = next(iter(groups.values()), None)
            node = first[0] if first else self.get_default_node()
            indexes = groups.setdefault(node.name, (node, []))[1]
            indexes.extend(keyless)
            indexes.sort()
        return groups

    def _node_for(self, args: tuple[Any, ...], options: dict[str, Any],
                  asked: str | None) -> ClusterNode | None:
        if asked is not None:
            node = self.get_node(node_name=asked)
            if node is None:
                raise SlotNotCoveredError(f"the node {asked} of an ASK is not known yet")
            return node
        target = options.get("target_nodes")
        if isinstance(target, ClusterNode):
            return target
        key = routing_key(args)
        return None if key is None else self.get_node_from_key(key)

    async def _send_node(
        self, node: ClusterNode, commands: Sequence[Command], indexes: Sequence[int],
        asking: dict[int, str], replies: list[Any], wait: tuple[int, int] | None,
    ) -> int | None:
        """One node's pipeline; fills ``replies``; returns what its WAIT counted
        (None without WAIT, or when none of its commands ran)."""
        batch: list[PipelineCommand] = []
        for index in indexes:
            if index in asking:
                batch.append(PipelineCommand(-1, "ASKING"))
            args, options = commands[index]
            options = {k: v for k, v in options.items() if k != "target_nodes"}
            batch.append(PipelineCommand(index, *args, **options))
        if wait is not None:
            batch.append(PipelineCommand(-2, "WAIT", *wait))
        # What redis-py puts in a command's result until it is answered (None up
        # to 8.1, a marker object of its own since 8.2): never taken as a reply.
        unanswered = batch[0].result
        try:
            async with self._in_flight:
                await node.execute_pipeline(batch)
        except Exception as exc:  # sending failed: no command has a reply
            for command in batch:
                if command.result is unanswered:
                    command.result = exc
        for command in batch:
            if command.result is unanswered:  # not read back: as if the connection dropped
                command.result = RedisConnectionError(
                    f"no reply from {node.name}: the connection ended before it was read")
        lost = next((c.result for c in batch
                     if isinstance(c.result, Exception) and _connection_error(c.result)), None)
        if lost is not None:
            # As redis-py does for one command: connections of this node are
            # made again, and the slot map is read again before the next send.
            node.update_active_connections_for_reconnect()
            await node.disconnect_free_connections()
            self.nodes_manager.move_node_to_end_of_cached_nodes(node.name)
            self._reread_map = True
        ran = False
        for command in batch:
            if command.position >= 0:
                replies[command.position] = command.result
                ran = ran or not isinstance(command.result, Exception)
        if wait is None or not ran:
            return None
        count = batch[-1].result
        return int(count) if isinstance(count, int) else 0


class _PubSub(ClusterPubSub):
    """redis-py's cluster subscription, which picks its node from the slot map
    without reading it first (a new client's map is empty)."""

    def __init__(self, client: ClusterClient, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        self._client = client

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if self.connection is None:
            await self._client._ready()
        try:
            return await super().execute_command(*args, **kwargs)
        except Exception as exc:
            if _connection_error(exc):
                self._client._reread_map = True  # the next subscription reads it again
            raise


class NodePipeline(ClusterPipeline):
    """A cluster pipeline (no transaction) sent by :meth:`ClusterClient.send_by_node`:
    redis-py's command methods queue here (a multi-key command of several slots
    is split per slot, as in redis-py's), and :meth:`execute` sends them."""

    def __init__(self, client: ClusterClient) -> None:
        super().__init__(client)
        self._client = client
        self._queued: list[Command] = []

    def execute_command(self, *args: Any, **kwargs: Any) -> NodePipeline:
        self._queued.append((args, kwargs))
        return self

    def __len__(self) -> int:
        return len(self._queued)

    def time(self, **kwargs: Any) -> NodePipeline:  # type: ignore[override]
        """The server's TIME, from the node of the batch's first keyed command."""
        return self.execute_command("TIME", **kwargs)

    async def reset(self) -> None:  # type: ignore[override]  # redis-py's own clash
        self._queued = []
        await super().reset()  # type: ignore[no-untyped-call]

    async def execute(
        self, raise_on_error: bool = True, allow_redirections: bool = True
    ) -> list[Any]:
        """Every reply in order; with ``raise_on_error`` the first error is raised."""
        commands, self._queued = self._queued, []
        if not commands:
            return []
        replies = (await self._client.send_by_node(commands)).replies
        if raise_on_error:
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
        return replies
