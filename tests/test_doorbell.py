"""The doorbell (issue 13, item 3): every script that appends to a partition log
publishes the agent once per call on ``<prefix>:ring``, with the earliest run
time it delayed a job to and the deadline of leases it started."""

from __future__ import annotations

import agentq
from agentq.consumers.doorbell import Ring
from agentq.eventlog.scripts import Backoff, ensure_work_groups


def test_a_ring_reads_its_words() -> None:
    assert Ring.parse("a") == Ring("a")
    assert Ring.parse("x_1-y d1700000000123") == Ring("x_1-y", run_ms=1700000000123)
    assert Ring.parse("b l5 d7") == Ring("b", run_ms=7, lease_ms=5)
    assert Ring.parse("!owners") is None
    assert Ring.parse("") is None


class Bell:
    """A subscription to a prefix's doorbell, for counting rings."""

    def __init__(self, q: agentq.Client) -> None:
        self.pubsub = q.redis.pubsub(ignore_subscribe_messages=True)
        self.channel = q.keys.ring

    async def __aenter__(self) -> Bell:
        await self.pubsub.subscribe(self.channel)
        while (await self.pubsub.get_message(timeout=1)) is not None:
            pass  # the subscription's reply
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.pubsub.aclose()  # type: ignore[no-untyped-call]

    async def rings(self, quiet: float = 0.2) -> list[str]:
        """The rings published until none came for ``quiet`` seconds."""
        got: list[str] = []
        while (message := await self.pubsub.get_message(timeout=quiet)) is not None:
            got.append(str(message["data"]))
        return got


async def server_ms(q: agentq.Client) -> int:
    seconds, micros = await q.redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def test_each_script_call_rings_once_with_what_falls_due(q: agentq.Client) -> None:
    part = q.partition("a")
    async with Bell(q) as bell:
        # One call, four events, two of them delayed: one ring, the earliest run time.
        before = await server_ms(q)
        await q.dispatch_many([
            {"target": "a", "task": "now"},
            {"target": "a", "task": "later", "delaySeconds": 30},
            {"target": "a", "task": "sooner", "delaySeconds": 20},
            {"target": "a", "task": "high", "priority": "high"},
        ], caller="b")
        (ring,) = await bell.rings()
        parsed = Ring.parse(ring)
        assert parsed is not None and parsed.agent == "a" and parsed.lease_ms is None
        assert parsed.run_ms is not None
        assert before + 20_000 <= parsed.run_ms <= await server_ms(q) + 20_000

        # A start of two jobs: one ring, with the deadline of the leases it gave.
        await ensure_work_groups(q.redis, part)
        started, _ = await q.scripts.start(part, "w1", 60_000, 2)
        assert len(started) == 2
        (ring,) = await bell.rings()
        parsed = Ring.parse(ring)
        assert parsed is not None and parsed.run_ms is None and parsed.lease_ms is not None
        assert parsed.lease_ms >= before + 60_000

        # A failed attempt with a backoff: its retry's run time.
        first = started[0]
        assert await q.scripts.fail(part, "w1", first.job_id, 1, "x", Backoff(5_000, 5_000)) \
            == "delayed"
        (ring,) = await bell.rings()
        parsed = Ring.parse(ring)
        assert parsed is not None and parsed.run_ms is not None

        # Calls that append nothing ring nothing: a renewal, a refused completion,
        # a dispatch that only repeats an idempotency key.
        second = started[1]
        assert await q.scripts.renew(part, 60_000, [(second.job_id, 1)]) == [True]
        refused = await q.scripts.complete(part, "w1", [(first.job_id, 1, b"1")])
        assert refused[0] is not None
        await q.dispatch("a", "once", caller="b", idempotency_key="k")
        assert len(await bell.rings()) == 1
        await q.dispatch("a", "once", caller="b", idempotency_key="k")
        assert await bell.rings() == []
