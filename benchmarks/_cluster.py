"""A throwaway Redis Cluster on loopback, for tests and benchmarks.

    with local_cluster(masters=3, replicas=1) as cluster:
        cluster.url        # "redis+cluster://127.0.0.1:<port>" (agentq's scheme)
        cluster.node_url   # "redis://127.0.0.1:<port>" (redis-py's RedisCluster.from_url)
        master = cluster.node_for_slot(3300)
        cluster.kill(master.port)      # a master dies (SIGKILL)
        cluster.wait_ok()              # its replica has taken over
        cluster.restart(master.port)   # it comes back, as a replica

Each node is a ``redis-server --cluster-enabled yes`` on a free loopback port,
with a cluster bus port of its own (``--cluster-port``, so that a high data port
never pushes the bus past 65535), in a temporary directory, saving nothing
unless asked. ``redis-cli --cluster create`` makes the cluster; the launcher
then waits until every node says ``cluster_state:ok``, every slot is served and
every replica's link to its master is up, so that a test starts from a cluster
that can already fail over.

Failures are what this is for, so the helpers are the operator's moves: kill a
node by its pid, promote a replica with ``CLUSTER FAILOVER``, move one slot
(keys and all) to another master with the ``CLUSTER SETSLOT``/``MIGRATE`` steps
``redis-cli --cluster reshard`` performs, but for the slot the caller names.

Only the pids started here are ever signalled; stop() runs on an error or a
KeyboardInterrupt too (the context manager), and each server runs in a session
of its own, so a Ctrl-C in the terminal reaches only the caller.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from redis.crc import key_slot

from benchmarks._server import _answers_ping, _binary, _free_port, _log_tail, _stop

__all__ = ["ClusterError", "LocalCluster", "Node", "local_cluster", "slot_of"]

SLOTS = 16384
_PORT_ATTEMPTS = 5
_START_TIMEOUT = 10.0


class ClusterError(RuntimeError):
    """The cluster could not be started or did not reach the state asked for."""


def slot_of(key: str | bytes) -> int:
    """The hash slot of a key (its ``{tag}`` when it has one), as Redis computes it."""
    return key_slot(key.encode() if isinstance(key, str) else key)


@dataclass
class Node:
    """One ``redis-server`` of the cluster. ``role`` is what the cluster said when
    last asked (``LocalCluster.nodes`` asks again); ``alive`` turns false once the
    launcher has killed or stopped it."""

    port: int
    bus_port: int
    pid: int
    role: str
    dir: Path
    process: subprocess.Popen[bytes] = field(repr=False)
    argv: list[str] = field(default_factory=list, repr=False)
    node_id: str = ""
    master_id: str | None = None
    alive: bool = True

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.dir / "redis.log"

    def client(self, **kwargs: Any) -> redis.Redis:
        """A plain (non-cluster) connection to this node alone, decoding replies."""
        return redis.Redis(
            host="127.0.0.1", port=self.port, decode_responses=True,
            socket_timeout=kwargs.pop("socket_timeout", 5.0), **kwargs,
        )  # fmt: skip


def _info(node: Node) -> dict[str, str]:
    """``CLUSTER INFO`` as a dict (empty when the node does not answer)."""
    try:
        with node.client(socket_timeout=1.0) as conn:
            text = conn.execute_command("CLUSTER INFO")
    except redis.RedisError:
        return {}
    if isinstance(text, dict):  # redis-py parses it already
        return {str(k): str(v) for k, v in text.items()}
    if isinstance(text, bytes):
        text = text.decode()
    pairs = (line.split(":", 1) for line in str(text).splitlines() if ":" in line)
    return {k.strip(): v.strip() for k, v in pairs}


def _wait(what: str, check: Callable[[], bool], timeout: float, detail: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if time.monotonic() >= deadline:
            raise ClusterError(f"{what} not reached in {timeout:g}s\n{detail()}")
        time.sleep(0.05)


def _answers_in_time(proc: subprocess.Popen[bytes], port: int) -> bool:
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        if _answers_ping(port):
            return True
        time.sleep(0.02)
    return False


class LocalCluster:
    """A Redis Cluster of ``masters`` masters with ``replicas`` replicas each.

    ``start()`` and ``stop()`` for session fixtures; ``local_cluster()`` for a
    ``with`` block. ``node_timeout_ms`` is ``cluster-node-timeout``: how long a
    silent master takes to be declared failed (and its replica promoted).
    ``persistence`` turns on the append-only file (``appendfsync everysec``);
    ``extra_args`` go to every node's command line.
    """

    def __init__(
        self,
        masters: int = 3,
        replicas: int = 1,
        *,
        node_timeout_ms: int = 2000,
        persistence: bool = False,
        extra_args: list[str] | None = None,
        binary: str | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        self.masters = masters
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.persistence = persistence
        self.extra_args = list(extra_args or [])
        self.binary = binary
        self.start_timeout = start_timeout
        self.dir: Path | None = None
        self._nodes: list[Node] = []
        self._started: list[int] = []

    # -- addresses ---------------------------------------------------------

    def _entry(self) -> Node:
        for node in self._nodes:
            if node.alive and node.process.poll() is None:
                return node
        raise ClusterError("no node of the cluster is running")

    @property
    def url(self) -> str:
        """agentq's URL for the cluster: any one live node; the rest are discovered."""
        return f"redis+cluster://{self._entry().address}"

    @property
    def node_url(self) -> str:
        """A plain ``redis://`` URL of one live node, for ``RedisCluster.from_url``."""
        return f"redis://{self._entry().address}"

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self._nodes]

    @property
    def pids(self) -> list[int]:
        """Every pid this launcher started (also those it has since killed)."""
        return list(self._started)

    def node(self, port: int) -> Node:
        for node in self._nodes:
            if node.port == port:
                return node
        raise KeyError(f"no node of this cluster listens on {port}")

    @property
    def nodes(self) -> list[Node]:
        """The nodes, with roles and ids as the cluster reports them now."""
        self._refresh()
        return list(self._nodes)

    def masters_now(self) -> list[Node]:
        return [n for n in self.nodes if n.alive and n.role == "master"]

    def replicas_of(self, port: int) -> list[Node]:
        master = self.node(port)
        return [n for n in self.nodes if n.alive and n.master_id == master.node_id]

    def _view(self, node: Node) -> list[dict[str, Any]]:
        """``CLUSTER NODES`` as ``node`` sees it, parsed (a row per node it knows)."""
        with node.client(socket_timeout=2.0) as conn:
            conn.set_response_callback("CLUSTER NODES", lambda r, **_: r)  # the raw text
            text = conn.execute_command("CLUSTER NODES")
        if isinstance(text, bytes):
            text = text.decode()
        rows = []
        for line in str(text).splitlines():
            parts = line.split()
            if len(parts) < 8:
                continue
            address = parts[1].split("@")[0]
            rows.append({
                "id": parts[0], "port": int(address.rsplit(":", 1)[1] or 0),
                "flags": set(parts[2].split(",")),
                "master": None if parts[3] == "-" else parts[3],
                "connected": parts[7] == "connected",
                "slots": [p for p in parts[8:] if not p.startswith("[")],  # not migrations
            })  # fmt: skip
        return rows

    def _cluster_nodes(self) -> list[dict[str, Any]]:
        """``CLUSTER NODES`` of the first live node that answers."""
        last: Exception | None = None
        for node in self._nodes:
            if not node.alive:
                continue
            try:
                return self._view(node)
            except redis.RedisError as exc:
                last = exc
        raise ClusterError(f"no node answered CLUSTER NODES: {last}")

    def _refresh(self) -> None:
        by_port = {row["port"]: row for row in self._cluster_nodes()}
        for node in self._nodes:
            row = by_port.get(node.port)
            if row is None:
                continue
            node.node_id = row["id"]
            node.role = "master" if "master" in row["flags"] else "replica"
            node.master_id = row["master"]

    def node_for_slot(self, slot: int) -> Node:
        """The master serving ``slot`` now (by ``CLUSTER SLOTS`` of a live node)."""
        if not 0 <= slot < SLOTS:
            raise ValueError(f"slot {slot} is not in 0..{SLOTS - 1}")
        for node in self._nodes:
            if not node.alive:
                continue
            try:
                with node.client(socket_timeout=2.0) as conn:
                    ranges = conn.execute_command("CLUSTER SLOTS")
            except redis.RedisError:
                continue
            for entry in ranges:
                start, end, master = int(entry[0]), int(entry[1]), entry[2]
                if start <= slot <= end:
                    return self.node(int(master[1]))
            raise ClusterError(f"slot {slot} is served by no node")
        raise ClusterError("no node answered CLUSTER SLOTS")

    def node_for_key(self, key: str | bytes) -> Node:
        return self.node_for_slot(slot_of(key))

    # -- life --------------------------------------------------------------

    def _start_node(self, index: int) -> Node:
        assert self.dir is not None
        workdir = self.dir / f"node{index}"
        workdir.mkdir()
        exe = _binary(self.binary)
        durability = (
            ["--appendonly", "yes", "--appendfsync", "everysec"]
            if self.persistence else ["--appendonly", "no"]
        )  # fmt: skip
        tail = ""
        for _ in range(_PORT_ATTEMPTS):
            port, bus_port = _free_port(), _free_port()
            if bus_port == port:
                continue
            argv = [
                exe,
                "--port", str(port),
                "--bind", "127.0.0.1",
                "--save", "",
                *durability,
                "--dir", str(workdir),
                "--logfile", str(workdir / "redis.log"),
                "--daemonize", "no",
                "--protected-mode", "yes",
                "--cluster-enabled", "yes",
                "--cluster-port", str(bus_port),
                "--cluster-config-file", str(workdir / "nodes.conf"),
                "--cluster-node-timeout", str(self.node_timeout_ms),
                # a replica's first sync starts at once, not after the default 5 s
                "--repl-diskless-sync-delay", "0",
                *self.extra_args,
            ]  # fmt: skip
            proc = self._spawn(argv)
            node = Node(port, bus_port, proc.pid, "master", workdir, proc, argv)
            self._nodes.append(node)  # recorded at once: stop() must find it whatever happens
            if _answers_in_time(proc, port):
                return node
            _stop(proc)
            node.alive = False
            self._nodes.remove(node)
            # Most likely a port was taken between the probe and the bind: try others.
            tail = _log_tail(workdir / "redis.log")
            (workdir / "redis.log").unlink(missing_ok=True)
        raise ClusterError(f"a cluster node did not start after {_PORT_ATTEMPTS} attempts:\n{tail}")

    def _spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._started.append(proc.pid)
        return proc

    def start(self) -> LocalCluster:
        """Start the nodes, create the cluster, wait until it is whole. On any
        failure (or Ctrl-C) what was started is stopped before the error goes on."""
        if self._nodes:
            raise ClusterError("this cluster is already started")
        self.dir = Path(tempfile.mkdtemp(prefix="agentq-cluster-"))
        try:
            for index in range(self.masters * (1 + self.replicas)):
                self._start_node(index)
            self._create()
            self.wait_ok(self.start_timeout, replicas_linked=True)
        except BaseException:
            self.stop()
            raise
        return self

    def _create(self) -> None:
        cli = shutil.which(os.environ.get("REDIS_CLI") or "redis-cli")
        if cli is None:
            raise ClusterError("redis-cli is not on PATH (set REDIS_CLI to its path)")
        argv = [
            cli, "--cluster", "create", *(n.address for n in self._nodes),
            "--cluster-replicas", str(self.replicas), "--cluster-yes",
        ]  # fmt: skip
        out = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=self.start_timeout, check=False,
        )  # fmt: skip
        if out.returncode != 0 or "[OK] All 16384 slots covered" not in out.stdout:
            raise ClusterError(f"redis-cli --cluster create failed:\n{out.stdout}\n{out.stderr}")

    def _health(self, replicas_linked: bool) -> str:
        """What is not yet right, one line per problem ('' when all is): every live
        node must say ``cluster_state:ok``, see every slot served by a live master
        it does not suspect, and agree with the others on who serves what."""
        live = [n for n in self._nodes if n.alive]
        live_ports = {n.port for n in live}
        problems = []
        owners: dict[int, frozenset[tuple[str, int]]] = {}
        for node in live:
            info = _info(node)
            if info.get("cluster_state") != "ok":
                problems.append(f"{node.address}: cluster_state={info.get('cluster_state')}")
                continue
            try:
                rows = self._view(node)
            except redis.RedisError as exc:
                problems.append(f"{node.address}: {exc}")
                continue
            covered = 0
            owned: set[tuple[str, int]] = set()
            for row in rows:
                if row["port"] in live_ports and {"fail", "fail?"} & row["flags"]:
                    problems.append(f"{node.address} sees {row['port']} as failing")
                if row["port"] in live_ports:  # who replicates whom: part of the agreement
                    owned.add((row["master"] or "master", row["port"]))
                if "master" not in row["flags"] or not row["slots"]:
                    continue
                if row["port"] not in live_ports:
                    problems.append(f"{node.address} sees slots served by dead {row['port']}")
                for part in row["slots"]:
                    lo, _, hi = part.partition("-")
                    covered += int(hi or lo) - int(lo) + 1
                    owned.add((part, row["port"]))
            if covered != SLOTS:
                problems.append(f"{node.address} sees {covered}/{SLOTS} slots served")
            owners[node.port] = frozenset(owned)
        if len(set(owners.values())) > 1:
            problems.append("the nodes do not yet agree on who serves which slots, or on roles")
        if replicas_linked:
            for node in live:
                try:
                    with node.client(socket_timeout=1.0) as conn:
                        repl = conn.info("replication")
                except redis.RedisError as exc:
                    problems.append(f"{node.address}: {exc}")
                    continue
                link = repl.get("master_link_status")
                if repl.get("role") == "slave" and link != "up":
                    problems.append(f"{node.address}: replica link {link}")
        return "\n".join(problems)

    def wait_ok(self, timeout: float = 30.0, *, replicas_linked: bool = False) -> None:
        """Wait until every live node says ``cluster_state:ok`` and the live masters
        serve every slot (and, with ``replicas_linked``, every live replica's link to
        its master is up); raise ClusterError with what is still wrong otherwise."""
        _wait(
            "cluster_state:ok on every node",
            lambda: self._health(replicas_linked) == "",
            timeout,
            lambda: self._health(replicas_linked),
        )

    def kill(self, port: int) -> None:
        """SIGKILL the node on ``port`` (by the pid started here) and reap it.
        The cluster notices after ``node_timeout_ms``; ``wait_ok()`` waits for that."""
        node = self.node(port)
        if node.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(node.pid, signal.SIGKILL)
            node.process.wait(timeout=10)
        node.alive = False

    def restart(self, port: int, *, timeout: float = 30.0) -> None:
        """Start a killed node again, on its port with its ``nodes.conf``: it rejoins
        the cluster (a killed master comes back as a replica of the one that took
        over, empty unless ``persistence``); return once every replica is linked."""
        node = self.node(port)
        if node.alive:
            raise ClusterError(f"{node.address} is running")
        proc = self._spawn(node.argv)
        node.process, node.pid = proc, proc.pid
        if not _answers_in_time(proc, port):
            _stop(proc)
            raise ClusterError(f"{node.address} did not start again:\n{_log_tail(node.log)}")
        node.alive = True
        self.wait_ok(timeout, replicas_linked=True)

    def failover(self, replica_port: int, *, mode: str = "", timeout: float = 30.0) -> None:
        """``CLUSTER FAILOVER [FORCE|TAKEOVER]`` on a replica; return once it is a
        master and the cluster is whole again."""
        node = self.node(replica_port)
        args = ["CLUSTER", "FAILOVER", *([mode.upper()] if mode else [])]
        with node.client() as conn:
            conn.execute_command(*args)

        def promoted() -> bool:
            try:
                with node.client(socket_timeout=1.0) as conn:
                    return bool(conn.info("replication").get("role") == "master")
            except redis.RedisError:
                return False

        _wait(f"{node.address} promoted", promoted, timeout, lambda: _log_tail(node.log))
        self.wait_ok(timeout, replicas_linked=True)

    def reshard(
        self,
        slot_or_key: int | str | bytes,
        to_port: int,
        *,
        batch: int = 100,
        pause: float = 0.0,
        timeout_ms: int = 5000,
    ) -> int:
        """Move one slot (a number, or the slot of a key) with its keys to the master
        on ``to_port``, as ``redis-cli --cluster reshard`` does: IMPORTING on the
        target, MIGRATING on the source, ``MIGRATE ... KEYS`` in batches of ``batch``
        (sleeping ``pause`` s between them, to keep the slot half-moved longer, when
        a test wants clients to meet ASK), then ``SETSLOT NODE`` everywhere.
        Returns the number of keys moved."""
        slot = slot_or_key if isinstance(slot_or_key, int) else slot_of(slot_or_key)
        source = self.node_for_slot(slot)
        target = self.node(to_port)
        if source.port == target.port:
            return 0
        self._refresh()
        if target.role != "master":
            raise ClusterError(f"{target.address} is not a master")
        moved = 0
        with source.client() as src, target.client() as dst:
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
            while True:
                keys = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch)
                if not keys:
                    break
                src.execute_command(
                    "MIGRATE", "127.0.0.1", target.port, "", 0, timeout_ms, "KEYS", *keys
                )
                moved += len(keys)
                if pause:
                    time.sleep(pause)
            # The target first, so the slot is never owned by nobody (redis-cli's order).
            dst.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
        for other in self.masters_now():
            if other.port in (source.port, target.port):
                continue
            with other.client() as conn:
                conn.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
        self.wait_ok(30.0)  # every node, replicas too, agrees on the slot's new owner
        return moved

    def stop(self) -> None:
        """Stop every node this launcher started, by pid (SIGTERM, then SIGKILL),
        and remove the working directory."""
        errors: list[BaseException] = []
        for node in self._nodes:
            try:
                _stop(node.process)
            except BaseException as exc:  # stop the others still, then re-raise
                with contextlib.suppress(ProcessLookupError):
                    os.kill(node.pid, signal.SIGKILL)
                errors.append(exc)
            node.alive = False
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        if errors:
            raise errors[0]

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def local_cluster(masters: int = 3, replicas: int = 1, **opts: Any) -> Iterator[LocalCluster]:
    """Start a LocalCluster (``opts`` as LocalCluster's), yield it, stop it."""
    cluster = LocalCluster(masters, replicas, **opts)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
