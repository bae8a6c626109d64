"""Who may see what, beyond status and history (issue 11 items 1 and 2, and 21's
``sessionKey`` default):

- ``dependsOn`` names only jobs the caller may view (it dispatched them or they
  target it), else the dispatch is refused with ``unauthorized`` and nothing is
  appended: a dependency's result is shown in the dependent's view;
- ``replay`` as a non-system caller gives only the events of jobs it may view,
  never a ``sessionKey``; system agents get everything;
- a state record reads as a view without ``sessionKey`` unless asked for it,
  while a handler (acting for the system) still sees it.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

import agentq
from agentq import tools
from agentq.eventlog import reader
from agentq.eventlog.records import to_view
from agentq.schemas._base import iso_to_micros
from agentq.schemas.config import Config
from agentq.schemas.errors import Unauthorized

MakeConfig = Callable[..., Config]
DEPEND_DENIED = "Unauthorized: you can only depend on jobs you dispatched or that target you."
SECRET = "sk-very-secret"


@pytest.fixture
async def q(redis_url: str, make_config: MakeConfig) -> AsyncIterator[agentq.Client]:
    config = make_config(rateLimit={"dispatchesPerMinute": 0, "maxQueueDepth": 0},
                         auth={"systemAgents": ["main", "ops"]})
    async with agentq.connect(redis_url, config) as client:
        for agent in ("a", "b", "c"):
            await client.add_agent(agent)
        yield client


async def _log_lengths(q: agentq.Client) -> dict[str, int]:
    return {a: await q.redis.xlen(q.partition(a).log) for a in ("a", "b", "c")}


# -- item 1: dependsOn -----------------------------------------------------------------


async def test_depending_on_a_job_one_may_not_view_is_unauthorized(q: agentq.Client) -> None:
    # b's job for c: a neither dispatched it nor is its target.
    private = await q.dispatch("c", "private work", caller="b")
    before = await _log_lengths(q)
    out = await tools.queue_dispatch(q, "a", {"target": "b", "task": "peek",
                                              "dependsOn": [private.job_id]})
    assert out == {"error": {"code": "unauthorized", "message": DEPEND_DENIED}}
    with pytest.raises(Unauthorized) as raised:
        await q.dispatch("b", "peek", caller="a", depends_on=[private.job_id])
    assert raised.value.message == DEPEND_DENIED and raised.value.exit_code == 4
    assert await _log_lengths(q) == before  # nothing appended
    # One forbidden among allowed ones refuses the whole batch.
    mine = await q.dispatch("b", "mine", caller="a")
    before = await _log_lengths(q)
    with pytest.raises(Unauthorized):
        await q.dispatch_many([
            {"target": "b", "task": "ok", "dependsOn": [mine.job_id]},
            {"target": "c", "task": "not ok", "dependsOn": [mine.job_id, private.job_id]},
        ], caller="a")
    assert await _log_lengths(q) == before  # nothing appended


async def test_depending_on_jobs_one_dispatched_or_that_target_one(q: agentq.Client) -> None:
    sent = await q.dispatch("b", "sent by a", caller="a")
    for_a = await q.dispatch("a", "for a", caller="c")
    view = await q.dispatch("c", "both", caller="a", depends_on=[sent.job_id, for_a.job_id])
    assert view.state == "waiting_dependencies"
    assert set(view.dependencies) == {sent.job_id, for_a.job_id}
    # A system agent may depend on anything, whoever dispatched it.
    other = await q.dispatch("c", "b's", caller="b")
    for system in ("main", "ops"):
        made = await q.dispatch("a", "audit", caller=system, depends_on=[other.job_id])
        assert made.depends_on == [other.job_id]


async def test_a_missing_dependency_is_still_not_found_first(q: agentq.Client) -> None:
    private = await q.dispatch("c", "private", caller="b")
    missing = "j_01ARZ3NDEKTSV4RRFFQ69G5FAV.c"
    out = await tools.queue_dispatch(q, "a", {"target": "b", "task": "x",
                                              "dependsOn": [private.job_id, missing]})
    assert out["error"] == {"code": "not_found", "message": f"Dependency job {missing} not found"}


async def test_an_idempotent_repeat_is_not_refused_for_its_dependencies(
    q: agentq.Client,
) -> None:
    sent = await q.dispatch("b", "sent", caller="a")
    first = await q.dispatch("c", "x", caller="a", depends_on=[sent.job_id],
                             idempotency_key="k1")
    again = await q.dispatch("c", "x", caller="a", depends_on=[sent.job_id],
                             idempotency_key="k1")
    assert again.job_id == first.job_id


# -- item 2: replay --------------------------------------------------------------------


async def _replay(q: agentq.Client, caller: str | None, **kw: Any) -> list[dict[str, Any]]:
    return [e.stored().wire() async for e in q.replay(caller=caller, **kw)]


async def test_replay_as_an_agent_shows_only_its_jobs_and_no_session_key(
    q: agentq.Client,
) -> None:
    to_b = await q.dispatch("b", "a to b", caller="a", session_key=SECRET)
    to_a = await q.dispatch("a", "c to a", caller="c", session_key=SECRET)
    hidden = await q.dispatch("c", "b to c", caller="b", session_key=SECRET)
    await q.cancel(to_b.job_id, caller="a")
    await q.cancel(hidden.job_id, caller="b")

    everything = await _replay(q, None)
    assert {e["jobId"] for e in everything} == {to_b.job_id, to_a.job_id, hidden.job_id}
    assert all(e["data"]["sessionKey"] == SECRET
               for e in everything if e["type"] == "JobDispatched")
    assert await _replay(q, "ops") == everything  # any system agent

    as_a = await _replay(q, "a")
    assert [(e["type"], e["jobId"]) for e in as_a] == [
        (e["type"], e["jobId"]) for e in everything if e["jobId"] != hidden.job_id]
    assert all("sessionKey" not in e["data"] for e in as_a)
    as_b = await _replay(q, "b", agents=["c"])  # its own job in another partition
    assert {e["jobId"] for e in as_b} == {hidden.job_id}
    # Events before --since: the job's dispatch is out of the window, the rule holds.
    cancelled_at = next(e for e in everything if e["type"] == "JobCancelled")["at"]
    since = iso_to_micros(cancelled_at)
    late_a = await _replay(q, "a", since_us=since)
    assert [(e["type"], e["jobId"]) for e in late_a] == [("JobCancelled", to_b.job_id)]
    late_c = await _replay(q, "c", since_us=since)  # hidden targets c
    assert [(e["type"], e["jobId"]) for e in late_c] == [("JobCancelled", hidden.job_id)]
    late_b = await _replay(q, "b", since_us=since)
    assert [(e["type"], e["jobId"]) for e in late_b] == [
        ("JobCancelled", to_b.job_id), ("JobCancelled", hidden.job_id)]


def test_replay_cli_honours_as(redis_url: str, make_config: MakeConfig) -> None:
    prefix = make_config().key_prefix
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTQ_")}
    env.update(AGENTQ_KEY_PREFIX=prefix, AGENTQ_RATE_LIMIT__DISPATCHES_PER_MINUTE="0")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "agentq.cli", *args, "--redis", redis_url],
                              capture_output=True, text=True, env=env, timeout=60, check=False)

    async def setup() -> tuple[str, str]:
        async with agentq.connect(redis_url, Config(key_prefix=prefix)) as api:
            for agent in ("a", "b", "c"):
                await api.add_agent(agent)
            mine = await api.dispatch("b", "mine", caller="a", session_key=SECRET)
            other = await api.dispatch("c", "other", caller="b", session_key=SECRET)
            return mine.job_id, other.job_id

    mine, other = asyncio.run(setup())
    as_a, as_op = cli("replay", "--as", "a"), cli("replay")
    assert as_a.returncode == 0 and as_op.returncode == 0, (as_a.stderr, as_op.stderr)
    seen = [json.loads(line) for line in as_a.stdout.splitlines()]
    assert [e["jobId"] for e in seen] == [mine]
    assert "sessionKey" not in seen[0]["data"]
    everything = [json.loads(line) for line in as_op.stdout.splitlines()]
    assert [e["jobId"] for e in everything] == [mine, other]
    assert everything[0]["data"]["sessionKey"] == SECRET
    job = cli("replay", "--as", "a", "--job", other)
    assert (job.returncode, job.stdout) == (0, "")


# -- item 21: the sessionKey default ---------------------------------------------------


async def test_a_record_reads_without_its_session_key_unless_asked(q: agentq.Client) -> None:
    job = await q.dispatch("b", "x", caller="a", session_key=SECRET)
    record = await reader.read_record(q.redis, q.partition("b"), job.job_id)
    assert to_view(job.job_id, record).session_key is None
    assert to_view(job.job_id, record, with_session_key=True).session_key == SECRET


async def test_a_handler_still_sees_the_session_key(q: agentq.Client) -> None:
    seen: dict[str, str | None] = {}

    def handler(job: Any) -> str:
        seen[job.view.task] = job.view.session_key
        return "done"

    worker = q.worker("b", handler)  # with the gates, to release the dependent
    running = asyncio.create_task(worker.run())
    try:
        first = await q.dispatch("b", "first", caller="a", session_key=SECRET)
        # A released dependent's view is read with its dependencies by the worker.
        second = await q.dispatch("b", "second", caller="a", session_key=SECRET,
                                  depends_on=[first.job_id])
        for job in (first, second):
            view, timed_out = await q.wait(job.job_id, timeout=20)
            assert (view.state, timed_out) == ("completed", False)
    finally:
        worker.stop()
        await running
    assert seen == {"first": SECRET, "second": SECRET}
