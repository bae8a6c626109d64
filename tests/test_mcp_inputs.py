"""The tools' inputs as a language model writes them (issue 12, item 15): ``queue_list``
takes one state or a list of states; ``queue_activity`` refuses an agent nobody knows
rather than answering with an empty or made-up entry."""

from __future__ import annotations

import pytest

import agentq
from agentq import tools
from agentq.schemas.errors import UnknownAgent


async def _one_cancelled_one_queued(q: agentq.Client) -> tuple[str, str]:
    cancelled = await q.dispatch("a", "to be cancelled", caller="b")
    queued = await q.dispatch("a", "stays queued", caller="b")
    await q.cancel(cancelled.job_id)
    return cancelled.job_id, queued.job_id


async def test_list_takes_one_state_as_a_string(q: agentq.Client) -> None:
    cancelled, queued = await _one_cancelled_one_queued(q)
    one = await tools.queue_list(q, "b", {"state": "cancelled"})
    assert [job["jobId"] for job in one["jobs"]] == [cancelled], one
    both = await tools.queue_list(q, "b", {"state": ["cancelled", "queued"]})
    assert [job["jobId"] for job in both["jobs"]] == [queued, cancelled]
    assert (await tools.queue_list(q, "b", {"state": "failed"}))["jobs"] == []


@pytest.mark.parametrize("state", ["finished", ["queued", "finished"], 3, [], ""])
async def test_list_refuses_a_state_that_is_none(q: agentq.Client, state: object) -> None:
    out = await tools.queue_list(q, "b", {"state": state})
    assert out["error"]["code"] == "invalid_input", out
    assert "state" in out["error"]["message"]


async def test_activity_refuses_an_unknown_agent(q: agentq.Client) -> None:
    for caller in ("main", "b"):
        out = await tools.queue_activity(q, caller, {"agents": ["a", "nobody"]})
        assert out == {"error": {"code": "unknown_agent",
                                 "message": "Unknown target agent: nobody"}}, (caller, out)
    with pytest.raises(UnknownAgent) as raised:
        await q.activity(["nobody"])
    assert raised.value.agent == "nobody"
    # Known agents still answer, and the whole list of known agents is the default.
    assert set((await tools.queue_activity(q, "main", {"agents": ["a"]}))["agents"]) == {"a"}
    assert set((await tools.queue_activity(q, "main", {}))["agents"]) == {"a", "b", "c"}
