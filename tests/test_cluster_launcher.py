"""The local Redis Cluster launcher (benchmarks/_cluster.py) that the cluster
tests and benchmarks stand on: it starts whole, its failure moves work, and it
leaves no process behind, also when its start is interrupted."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import redis

from benchmarks._cluster import SLOTS, LocalCluster, local_cluster, slot_of


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    # a 1 s node timeout: the killed master's replica takes over in about 2 s, not 4
    with local_cluster(masters=3, replicas=1, node_timeout_ms=1000) as started:
        yield started


def test_it_starts_whole(cluster: LocalCluster) -> None:
    nodes = cluster.nodes
    assert len(nodes) == 6
    assert sorted(n.role for n in nodes) == ["master"] * 3 + ["replica"] * 3
    assert all(len(cluster.replicas_of(m.port)) == 1 for m in cluster.masters_now())
    assert cluster.url.startswith("redis+cluster://127.0.0.1:")
    assert cluster.node_url.startswith("redis://127.0.0.1:")
    for node in nodes:
        with node.client() as conn:
            info = conn.cluster("info")
        assert info["cluster_state"] == "ok"
        assert int(info["cluster_slots_ok"]) == SLOTS
    # the agents a, b, c of the flow tests hash to three slots, each on its own master
    slots = [slot_of(name) for name in "abc"]
    assert slots == [15495, 3300, 7365]
    assert len({cluster.node_for_slot(s).port for s in slots}) == 3


def test_redis_py_reaches_every_node(cluster: LocalCluster) -> None:
    client = redis.RedisCluster.from_url(cluster.node_url)
    try:
        for name in "abc":
            client.set(f"launcher:{{{name}}}", name)
        assert [client.get(f"launcher:{{{n}}}") for n in "abc"] == [b"a", b"b", b"c"]
    finally:
        client.close()


def test_reshard_moves_a_slot_and_its_keys(cluster: LocalCluster) -> None:
    client = redis.RedisCluster.from_url(cluster.node_url)
    try:
        for i in range(30):
            client.set(f"launcher:{{a}}:{i}", i)
        source = cluster.node_for_key("a")
        target = next(m for m in cluster.masters_now() if m.port != source.port)
        assert cluster.reshard("a", target.port, batch=7) >= 30
        assert cluster.node_for_key("a").port == target.port
        assert client.get("launcher:{a}:29") == b"29"
        with target.client() as conn:
            assert conn.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot_of("a")) >= 30
    finally:
        client.close()


def test_failover_promotes_the_replica(cluster: LocalCluster) -> None:
    master = cluster.node_for_key("b")
    replica = cluster.replicas_of(master.port)[0]
    cluster.failover(replica.port)
    assert cluster.node_for_key("b").port == replica.port
    assert {n.port: n.role for n in cluster.nodes}[master.port] == "replica"
    cluster.failover(master.port)  # and back, for the tests after this one
    assert cluster.node_for_key("b").port == master.port


def test_a_killed_master_is_replaced_and_comes_back_and_stop_leaves_no_process(
    cluster: LocalCluster,
) -> None:
    """Last of the module, as it ends with stop() (the fixture's stop then does nothing)."""
    master = cluster.node_for_key("c")
    replica = cluster.replicas_of(master.port)[0]
    killed_pid = master.pid
    cluster.kill(master.port)
    assert not _running(killed_pid)
    cluster.wait_ok(30)
    assert cluster.node_for_key("c").port == replica.port
    cluster.restart(master.port)  # back, as the new master's replica
    assert {n.port: n.master_id for n in cluster.nodes}[master.port] == replica.node_id
    assert cluster.node_for_key("c").port == replica.port
    pids = cluster.pids
    assert len(pids) == 7  # six started, one started again
    cluster.stop()
    assert not any(_running(pid) for pid in pids)
    assert cluster.dir is None


def test_an_interrupted_start_leaves_no_process(monkeypatch: pytest.MonkeyPatch) -> None:
    cluster = LocalCluster(masters=3, replicas=0)

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cluster, "_create", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cluster.start()
    assert len(cluster.pids) == 3
    assert not any(_running(pid) for pid in cluster.pids)
    assert cluster.dir is None
