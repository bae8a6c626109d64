"""The timetable (consumers/timetable.py): a reply that left the server before a
ring's write must not erase the time the ring told (a lost wake-up leaves a
delayed job waiting until the slow sweep comes round)."""

from __future__ import annotations

import asyncio

from agentq.consumers.timetable import Timetable

NOW_MS = 1_800_000_000_000


async def test_a_ring_during_a_look_outlives_the_looks_reply() -> None:
    table = Timetable()
    table.set("a", NOW_MS, NOW_MS)  # due now
    await asyncio.sleep(0.002)

    async def look(agent: str) -> tuple[int | None, int]:
        # The script ran before the dispatch: nothing waits, it says. Meanwhile
        # the dispatch's ring says a job falls due in 50 ms.
        table.earlier(agent, NOW_MS + 50)
        return None, NOW_MS

    await table.act_on_due(lambda agent: True, look)
    assert not table.due_now()
    await asyncio.sleep(0.06)
    assert table.due() == ["a"]


async def test_a_survey_reply_keeps_an_earlier_time_a_ring_told() -> None:
    table = Timetable()
    table.earlier("b", NOW_MS + 20)  # rung while the survey was on its way
    table.set("b", None, NOW_MS)  # the survey ran before the dispatch
    table.set("c", NOW_MS + 5_000, NOW_MS)
    table.set("c", NOW_MS + 10, NOW_MS)  # a later look: sooner
    await asyncio.sleep(0.04)
    assert sorted(table.due()) == ["b", "c"]
