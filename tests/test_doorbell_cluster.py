"""The doorbell on a cluster: a ring is taken once, from the node that holds the
ringing partition's slot (where the script published it), not from the copies
the cluster bus brings to the other masters, which can be ~40 ms late."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import agentq
from agentq.consumers.doorbell import Doorbell, Ring
from agentq.schemas.config import Config
from benchmarks._cluster import LocalCluster


async def test_each_ring_is_taken_once_from_its_partitions_node(
    cluster: LocalCluster, make_config: Callable[..., Config]
) -> None:
    config = make_config(rateLimit={"dispatchesPerMinute": 0, "maxQueueDepth": 0})
    async with agentq.connect(cluster.url, config) as q:
        for agent in ("a", "b", "c"):  # on three different masters
            await q.add_agent(agent)
        rings: list[Ring] = []
        subscribed: list[int] = []
        bell = Doorbell(q._deployment.open_blocking(), q.keys.ring, on_ring=rings.append,
                        on_owners=lambda: None, on_subscribed=lambda: subscribed.append(1))
        stop = asyncio.Event()
        listening = asyncio.create_task(bell.run(stop))
        try:
            for _ in range(100):
                if len(subscribed) >= 3:  # one subscription per master
                    break
                await asyncio.sleep(0.05)
            assert len(subscribed) == 3
            for agent in ("a", "b", "c"):
                await q.dispatch(agent, "ring once", caller="a")
            await asyncio.sleep(0.5)  # a bus copy, were it taken, would have come by now
        finally:
            stop.set()
            await listening
        assert sorted(ring.agent for ring in rings) == ["a", "b", "c"]

