"""queue_dispatch's admission, against a real Redis: SPEC's checks, their order and
exact messages, idempotency keys, and the rate limit and queue-depth cap exact at
their boundaries under concurrency."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import orjson
import pytest

import agentq
from agentq.eventlog.ids import new_job_id
from agentq.schemas.config import Config
from agentq.schemas.errors import AgentqError
from agentq.schemas.job import JobView

MakeConfig = Callable[..., Config]


@asynccontextmanager
async def connect(redis_url: str, config: Config) -> AsyncIterator[agentq.Client]:
    async with agentq.connect(redis_url, config) as client:
        yield client


def limits(rate: int = 0, cap: int = 0, depth: int = 3, **agents: Any) -> dict[str, Any]:
    """Config overrides: the rate limit, the queue-depth cap, the depth limit, agents."""
    return {
        "rateLimit": {"dispatchesPerMinute": rate, "maxQueueDepth": cap},
        "limits": {"maxDepth": depth},
        "agents": agents,
    }


async def log_len(q: agentq.Client, *agents: str) -> int:
    return sum([await q.redis.xlen(q.partition(agent).log) for agent in agents])


async def counts(q: agentq.Client, agent: str) -> dict[str, int]:
    raw = await q.redis.hgetall(q.partition(agent).counts)
    return {state: int(n) for state, n in raw.items() if int(n) != 0}


async def refused(awaitable: Any) -> AgentqError:
    with pytest.raises(AgentqError) as info:
        await awaitable
    return info.value


# -- idempotency keys ----------------------------------------------------------------


async def test_idempotent_repeat_returns_the_first_job_and_appends_nothing(
    q: agentq.Client,
) -> None:
    first = await q.dispatch("a", "task", caller="b", idempotency_key="k1")
    before = (await log_len(q, "a"), await counts(q, "a"))
    again = await q.dispatch("a", "another task", caller="b", idempotency_key="k1", priority="high")
    assert again.job_id == first.job_id
    assert again.task == "task"
    assert again.priority == "normal"
    assert (await log_len(q, "a"), await counts(q, "a")) == before


async def test_idempotency_keys_are_per_caller(q: agentq.Client) -> None:
    first = await q.dispatch("a", "task", caller="b", idempotency_key="k1")
    other = await q.dispatch("a", "task", caller="c", idempotency_key="k1")
    assert other.job_id != first.job_id
    assert other.dispatched_by == "c"
    assert await counts(q, "a") == {"queued": 2}
    # Each caller's repeat finds its own job.
    assert (await q.dispatch("a", "t", caller="c", idempotency_key="k1")).job_id == other.job_id
    assert (await q.dispatch("a", "t", caller="b", idempotency_key="k1")).job_id == first.job_id
    assert await log_len(q, "a") == 2


async def test_concurrent_repeats_make_one_job(q: agentq.Client) -> None:
    views = await asyncio.gather(
        *[q.dispatch("a", "task", caller="b", idempotency_key="same") for _ in range(10)]
    )
    assert len({v.job_id for v in views}) == 1
    assert await log_len(q, "a") == 1
    assert await counts(q, "a") == {"queued": 1}


async def test_repeat_within_one_batch_makes_one_job(q: agentq.Client) -> None:
    """SPEC: a repeated idempotencyKey from the same caller returns the first job and
    appends nothing -- also when the repeat is in the same dispatch_many batch."""
    views = await q.dispatch_many(
        [
            {"target": "a", "task": "one", "idempotencyKey": "dup"},
            {"target": "a", "task": "two", "idempotencyKey": "dup"},
        ],
        caller="b",
    )
    assert views[0].job_id == views[1].job_id
    assert await log_len(q, "a") == 1
    assert await counts(q, "a") == {"queued": 1}


async def test_input_is_validated_before_the_idempotency_key(q: agentq.Client) -> None:
    await q.dispatch("a", "task", caller="b", idempotency_key="k1")
    error = await refused(q.dispatch("a", "x" * 50_001, caller="b", idempotency_key="k1"))
    assert error.code == "invalid_input"
    assert "task" in error.message


REPEAT_CASES = ["unknown_agent", "forbidden", "rate_limited", "queue_full", "dependency",
                "missing_parent", "depth"]  # fmt: skip


@pytest.mark.parametrize("case", REPEAT_CASES)
async def test_idempotent_repeat_wins_over_every_other_check(
    redis_url: str, make_config: MakeConfig, case: str
) -> None:
    """Each check refuses a fresh dispatch, yet the repeat returns the first job."""
    overrides = limits(
        rate=1 if case == "rate_limited" else 0,
        cap=1 if case == "queue_full" else 0,
        depth=0 if case == "depth" else 3,
        planner={"allowAgents": ["a"]},
        a={},
    )
    config = make_config(**overrides)
    async with AsyncExitStack() as stack:
        q = await stack.enter_async_context(connect(redis_url, config))
        first = await q.dispatch("a", "task", caller="planner", idempotency_key="k")
        extra: dict[str, Any] = {}
        expected = case
        if case == "unknown_agent":
            await q.remove_agent("a")
        elif case == "forbidden":
            overrides["agents"] = {"planner": {"allowAgents": ["b"]}, "b": {}}
            narrow = make_config(**overrides, keyPrefix=config.key_prefix)
            q = await stack.enter_async_context(connect(redis_url, narrow))
        elif case == "dependency":
            extra, expected = {"depends_on": [new_job_id("a")]}, "not_found"
        elif case == "missing_parent":
            extra, expected = {"parent_job_id": new_job_id("a")}, "not_found"
        elif case == "depth":
            extra, expected = {"parent_job_id": first.job_id}, "forbidden"
        before = await log_len(q, "a")
        fresh = await refused(q.dispatch("a", "task", caller="planner", **extra))
        assert fresh.code == expected
        again = await q.dispatch("a", "task", caller="planner", idempotency_key="k", **extra)
        assert again.job_id == first.job_id
        assert await log_len(q, "a") == before


# -- SPEC's checks, their messages and their order -------------------------------------


async def test_unknown_agent(q: agentq.Client) -> None:
    error = await refused(q.dispatch("nobody", "task", caller="b"))
    assert error.code == "unknown_agent"
    assert error.message == "Unknown target agent: nobody"
    assert await q.redis.exists(q.partition("nobody").log) == 0


async def test_removed_agent_is_unknown(q: agentq.Client) -> None:
    assert await q.remove_agent("c")
    error = await refused(q.dispatch("c", "task", caller="b"))
    assert (error.code, error.message) == ("unknown_agent", "Unknown target agent: c")


async def test_forbidden_by_allow_agents(redis_url: str, make_config: MakeConfig) -> None:
    config = make_config(**limits(planner={"allowAgents": ["a"]}, a={}, b={}))
    async with connect(redis_url, config) as q:
        assert (await q.dispatch("a", "task", caller="planner")).state == "queued"
        error = await refused(q.dispatch("b", "task", caller="planner"))
        assert error.code == "forbidden"
        assert error.message == 'Target agent "b" is not in allowAgents'
        assert await log_len(q, "b") == 0
        # Another caller without a list may dispatch anywhere ("*" by default).
        assert (await q.dispatch("b", "task", caller="a")).state == "queued"


async def test_dependency_not_found(q: agentq.Client) -> None:
    missing = new_job_id("b")
    error = await refused(q.dispatch("a", "task", caller="b", depends_on=[missing]))
    assert error.code == "not_found"
    assert error.message == f"Dependency job {missing} not found"
    malformed = await refused(q.dispatch("a", "task", caller="b", depends_on=["nope"]))
    assert (malformed.code, malformed.message) == ("not_found", "Dependency job nope not found")
    assert await log_len(q, "a") == 0


async def test_depth_limit_through_parent_chains(redis_url: str, make_config: MakeConfig) -> None:
    config = make_config(**limits(depth=2, a={}, b={}))
    async with connect(redis_url, config) as q:
        root = await q.dispatch("a", "root", caller="b")
        child = await q.dispatch("b", "child", caller="a", parent_job_id=root.job_id)
        grandchild = await q.dispatch("a", "grandchild", caller="b", parent_job_id=child.job_id)
        assert (root.depth, child.depth, grandchild.depth) == (0, 1, 2)
        assert grandchild.parent_job_id == child.job_id
        assert (await q.status(grandchild.job_id)).depth == 2
        before = await log_len(q, "a", "b")
        error = await refused(
            q.dispatch("b", "too deep", caller="a", parent_job_id=grandchild.job_id)
        )
        assert error.code == "forbidden"
        assert error.message == "Dispatch depth exceeded: 3/2"
        assert await log_len(q, "a", "b") == before
        # A sibling at an allowed depth still goes through.
        assert (await q.dispatch("b", "ok", caller="a", parent_job_id=child.job_id)).depth == 2


async def test_parent_that_does_not_exist_is_not_found(q: agentq.Client) -> None:
    missing = new_job_id("b")
    error = await refused(q.dispatch("a", "task", caller="b", parent_job_id=missing))
    assert error.code == "not_found"
    assert missing in error.message
    malformed = await refused(q.dispatch("a", "task", caller="b", parent_job_id="nope"))
    assert malformed.code == "not_found"
    assert await log_len(q, "a") == 0


async def test_queue_full_at_its_boundary(redis_url: str, make_config: MakeConfig) -> None:
    config = make_config(**limits(cap=3, a={}, b={}))
    async with connect(redis_url, config) as q:
        queued = await q.dispatch("a", "queued", caller="b")
        await q.dispatch("a", "delayed", caller="b", delay_seconds=3600)
        await q.dispatch("a", "third", caller="b")
        error = await refused(q.dispatch("a", "fourth", caller="b"))
        assert error.code == "queue_full"
        assert error.message == "Queue depth exceeded: 3/3 pending jobs for agent a"
        assert await counts(q, "a") == {"queued": 2, "delayed": 1}
        # Another agent's queue is its own.
        assert (await q.dispatch("b", "elsewhere", caller="a")).state == "queued"
        # A job that ends frees its place.
        await q.cancel(queued.job_id, caller="b")
        assert (await q.dispatch("a", "fourth", caller="b")).state == "queued"
        assert await counts(q, "a") == {"queued": 2, "delayed": 1, "cancelled": 1}


async def test_queue_full_batch_is_all_or_nothing(redis_url: str, make_config: MakeConfig) -> None:
    config = make_config(**limits(cap=2, a={}))
    async with connect(redis_url, config) as q:
        await q.dispatch("a", "one", caller="b")
        error = await refused(
            q.dispatch_many(
                [{"target": "a", "task": "x"}, {"target": "a", "task": "y"}], caller="b"
            )
        )
        assert error.code == "queue_full"
        assert error.message == "Queue depth exceeded: 1/2 pending jobs for agent a"
        assert await log_len(q, "a") == 1
        assert await counts(q, "a") == {"queued": 1}


async def test_rate_limited_at_its_boundary(redis_url: str, make_config: MakeConfig) -> None:
    config = make_config(**limits(rate=3, a={}))
    async with connect(redis_url, config) as q:
        for i in range(3):
            await q.dispatch("a", f"job {i}", caller="planner")
        error = await refused(q.dispatch("a", "one more", caller="planner"))
        assert error.code == "rate_limited"
        assert error.message == "Rate limit exceeded: 3/3 dispatches this minute"
        assert await log_len(q, "a") == 3
        # The window is per caller.
        assert (await q.dispatch("a", "someone else", caller="other")).state == "queued"


async def test_a_batch_larger_than_the_rate_limit_is_refused_whole(
    redis_url: str, make_config: MakeConfig
) -> None:
    config = make_config(**limits(rate=2, a={}))
    async with connect(redis_url, config) as q:
        await q.dispatch("a", "one", caller="planner")
        items = [{"target": "a", "task": "x"}, {"target": "a", "task": "y"}]
        error = await refused(q.dispatch_many(items, caller="planner"))
        assert error.message == "Rate limit exceeded: 1/2 dispatches this minute"
        assert await log_len(q, "a") == 1
        assert (await q.dispatch("a", "two", caller="planner")).state == "queued"


async def test_checks_run_in_spec_order(redis_url: str, make_config: MakeConfig) -> None:
    """Each adjacent pair of SPEC's checks, with both failing: the earlier one wins."""
    config = make_config(
        **limits(rate=1, cap=1, depth=0, planner={"allowAgents": ["a", "b"]}, a={}, b={}, c={})
    )
    async with connect(redis_url, config) as q:
        full_a = await q.dispatch("a", "fills a", caller="other")  # a is at its cap: 1/1
        await q.dispatch("b", "uses the window", caller="planner")  # planner's window: 1/1
        missing = new_job_id("a")

        # 1 before 2: invalid input to an unknown agent.
        error = await refused(q.dispatch("nobody", "", caller="planner"))
        assert error.code == "invalid_input"
        # 2 before 3: an unknown agent that is also not in allowAgents.
        error = await refused(q.dispatch("nobody", "task", caller="planner"))
        assert error.message == "Unknown target agent: nobody"
        # 3 before 4: forbidden while the window is used up.
        error = await refused(q.dispatch("c", "task", caller="planner"))
        assert error.message == 'Target agent "c" is not in allowAgents'
        # 4 before 5: rate limited while the target is full.
        error = await refused(q.dispatch("a", "task", caller="planner"))
        assert error.message == "Rate limit exceeded: 1/1 dispatches this minute"
        # 5 before 7: full, with a parent that is missing or too deep (fresh caller).
        for parent in (missing, full_a.job_id):
            error = await refused(q.dispatch("a", "task", caller="fresh", parent_job_id=parent))
            assert error.message == "Queue depth exceeded: 1/1 pending jobs for agent a"
        # 6 before 7: a missing dependency and a parent too deep.
        error = await refused(
            q.dispatch(
                "c", "task", caller="fresh", depends_on=[missing], parent_job_id=full_a.job_id
            )
        )
        assert error.message == f"Dependency job {missing} not found"
        # 7 alone.
        error = await refused(q.dispatch("c", "task", caller="fresh", parent_job_id=full_a.job_id))
        assert error.message == "Dispatch depth exceeded: 1/0"
        # None of the refusals used "fresh"'s window, nor wrote anything.
        assert (await q.dispatch("c", "task", caller="fresh")).state == "queued"
        assert await log_len(q, "a", "b", "c") == 3


async def test_refused_dispatches_do_not_count_toward_the_rate_limit(
    redis_url: str, make_config: MakeConfig
) -> None:
    config = make_config(
        **limits(rate=2, cap=2, depth=0, planner={"allowAgents": ["a", "b"]}, a={}, b={}, c={})
    )
    async with connect(redis_url, config) as q:
        parent = await q.dispatch("b", "one", caller="other")
        await q.dispatch("b", "two", caller="other")  # b is full
        attempts: list[tuple[str, dict[str, Any], str]] = [
            ("a", {"task": ""}, "invalid_input"),
            ("nobody", {}, "unknown_agent"),
            ("c", {}, "forbidden"),
            ("b", {}, "queue_full"),
            ("a", {"depends_on": [new_job_id("a")]}, "not_found"),
            ("a", {"parent_job_id": new_job_id("a")}, "not_found"),
            ("a", {"parent_job_id": parent.job_id}, "forbidden"),
        ]
        for target, fields, code in attempts:
            fields = {"task": "task", **fields}
            error = await refused(q.dispatch(target, caller="planner", **fields))
            assert error.code == code, (target, fields)
        await q.dispatch("a", "first", caller="planner")
        await q.dispatch("a", "second", caller="planner")
        error = await refused(q.dispatch("a", "third", caller="planner"))
        assert error.message == "Rate limit exceeded: 2/2 dispatches this minute"


async def test_idempotent_repeats_do_not_count_toward_the_rate_limit(
    redis_url: str, make_config: MakeConfig
) -> None:
    config = make_config(**limits(rate=2, a={}))
    async with connect(redis_url, config) as q:
        first = await q.dispatch("a", "task", caller="planner", idempotency_key="k")
        for _ in range(3):
            again = await q.dispatch("a", "task", caller="planner", idempotency_key="k")
            assert again.job_id == first.job_id
        await q.dispatch("a", "second", caller="planner")
        error = await refused(q.dispatch("a", "third", caller="planner"))
        assert error.message == "Rate limit exceeded: 2/2 dispatches this minute"


async def test_jobs_dispatched_by_a_partly_refused_batch_count_toward_the_rate_limit(
    redis_url: str, make_config: MakeConfig
) -> None:
    """A batch across partitions: a's job is dispatched, the unknown agent's is refused.
    Only the refused dispatch may be given back to the caller's window."""
    config = make_config(**limits(rate=3, a={}))
    async with connect(redis_url, config) as q:
        error = await refused(
            q.dispatch_many(
                [{"target": "a", "task": "x"}, {"target": "nobody", "task": "y"}], caller="planner"
            )
        )
        assert error.code == "unknown_agent"
        dispatched = error.dispatched  # type: ignore[attr-defined]
        assert [v.target for v in dispatched] == ["a"]
        assert await log_len(q, "a") == 1
        # One dispatch happened: two more fit in the window of three, not three.
        await q.dispatch("a", "second", caller="planner")
        await q.dispatch("a", "third", caller="planner")
        error = await refused(q.dispatch("a", "fourth", caller="planner"))
        assert error.message == "Rate limit exceeded: 3/3 dispatches this minute"
        assert await log_len(q, "a") == 3


# -- exact under concurrency ------------------------------------------------------------


async def dispatch_concurrently(
    redis_url: str, config: Config, n: int, caller: str
) -> tuple[list[JobView], list[AgentqError]]:
    """``n`` dispatches to agent a, each from its own client, all at once."""
    async with AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(connect(redis_url, config)) for _ in range(n)]
        outcomes = await asyncio.gather(
            *[c.dispatch("a", f"job {i}", caller=caller) for i, c in enumerate(clients)],
            return_exceptions=True,
        )
    views = [o for o in outcomes if isinstance(o, JobView)]
    errors = [o for o in outcomes if isinstance(o, AgentqError)]
    assert len(views) + len(errors) == n, outcomes
    return views, errors


async def test_queue_depth_cap_exact_with_20_concurrent_dispatchers(
    redis_url: str, make_config: MakeConfig
) -> None:
    config = make_config(**limits(cap=7, a={}))
    views, errors = await dispatch_concurrently(redis_url, config, 20, "planner")
    assert len(views) == 7
    assert len(errors) == 13
    assert {(e.code, e.message) for e in errors} == {
        ("queue_full", "Queue depth exceeded: 7/7 pending jobs for agent a")
    }
    async with connect(redis_url, config) as q:
        assert await counts(q, "a") == {"queued": 7}
        assert await log_len(q, "a") == 7


async def test_rate_limit_exact_with_concurrent_callers(
    redis_url: str, make_config: MakeConfig
) -> None:
    config = make_config(**limits(rate=5, a={}))
    views, errors = await dispatch_concurrently(redis_url, config, 20, "planner")
    assert len(views) == 5
    assert len(errors) == 15
    assert {(e.code, e.message) for e in errors} == {
        ("rate_limited", "Rate limit exceeded: 5/5 dispatches this minute")
    }
    async with connect(redis_url, config) as q:
        assert await log_len(q, "a") == 5


# -- invalid input -------------------------------------------------------------------------


def ids(n: int) -> list[str]:
    return [new_job_id("a") for _ in range(n)]


INVALID: list[tuple[dict[str, Any], str]] = [
    ({"task": "x" * 50_001}, "task"),
    ({"task": ""}, "task"),
    ({"target": "Bad Agent"}, "target"),
    ({"target": "-a"}, "target"),
    ({"target": "a" * 65}, "target"),
    ({"maxAttempts": 0}, "maxAttempts"),
    ({"maxAttempts": 21}, "maxAttempts"),
    ({"metadata": {"k": "x" * 16_377}}, "metadata"),  # 16,385 bytes as JSON
    ({"label": "x" * 501}, "label"),
    ({"dependsOn": ids(21)}, "dependsOn"),
    ({"priority": "urgent"}, "priority"),
    ({"timeoutSeconds": -1}, "timeoutSeconds"),
    ({"onDependencyFailure": "maybe"}, "onDependencyFailure"),
]


@pytest.mark.parametrize(("fields", "path"), INVALID, ids=[p for _, p in INVALID])
async def test_invalid_input_names_the_field(
    q: agentq.Client, fields: dict[str, Any], path: str
) -> None:
    raw = {"target": "a", "task": "task", **fields}
    error = await refused(q.dispatch_many([raw], caller="b"))
    assert error.code == "invalid_input"
    assert f"{path}:" in error.message
    assert await log_len(q, "a") == 0


async def test_invalid_input_in_a_batch_names_the_item(q: agentq.Client) -> None:
    error = await refused(
        q.dispatch_many([{"target": "a", "task": "ok"}, {"target": "a", "task": ""}], caller="b")
    )
    assert error.code == "invalid_input"
    assert "[1].task" in error.message
    assert await log_len(q, "a") == 0


async def test_invalid_input_through_keyword_arguments(q: agentq.Client) -> None:
    error = await refused(q.dispatch("a", "task", caller="b", max_attempts=0))
    assert error.code == "invalid_input"
    assert "maxAttempts" in error.message or "max_attempts" in error.message


async def test_inputs_at_their_limits_are_accepted(q: agentq.Client) -> None:
    metadata = {"k": "x" * 16_376}
    assert len(orjson.dumps(metadata)) == 16 * 1024
    view = await q.dispatch(
        "a",
        "x" * 50_000,
        caller="b",
        label="l" * 500,
        max_attempts=20,
        metadata=metadata,
        depends_on=[(await q.dispatch("b", "dep", caller="c")).job_id],
    )
    assert view.max_attempts == 20
    assert view.metadata == metadata
    assert len(view.task) == 50_000


async def test_dispatched_views_are_what_status_shows(q: agentq.Client) -> None:
    """dispatch builds its views without reading the records back: they must be
    the views status gives, for each starting state, for an agent and for a
    system agent (who sees sessionKey)."""
    first = await q.dispatch("a", "first", caller="b")
    items = [
        {"target": "a", "task": "plain", "label": "l", "metadata": {"k": 1}},
        {"target": "b", "task": "later", "delaySeconds": 30, "priority": "high"},
        {"target": "c", "task": "after", "dependsOn": [first.job_id], "delaySeconds": 5,
         "onDependencyFailure": "ignore", "sessionKey": "s", "announce": True},
    ]
    operator = q.config.auth.system_agents[0]
    for caller in ("b", operator):
        views = await q.dispatch_many(items, caller=caller)
        assert [v.state for v in views] == ["queued", "delayed", "waiting_dependencies"]
        for view in views:
            assert view == await q.status(view.job_id, caller=caller)


async def test_the_record_a_client_remembers_of_its_dispatch_is_the_one_written(
    q: agentq.Client,
) -> None:
    """wait() on a job the same client just dispatched starts from what the client
    remembers of the dispatch (the record and its JobDispatched event id) instead
    of reading the record: that must be exactly the record the script wrote."""
    from agentq.eventlog import reader

    first = await q.dispatch("a", "first", caller="b")
    views = await q.dispatch_many([
        {"target": "a", "task": "plain", "label": "l", "priority": "low"},
        {"target": "b", "task": "later", "delaySeconds": 30},
        {"target": "c", "task": "after", "dependsOn": [first.job_id], "delaySeconds": 5},
        {"target": "c", "task": "waits", "dependsOn": [first.job_id]},
    ], caller="b")
    for view in (first, *views):
        remembered = q.remembered.record(view.job_id)
        assert remembered is not None, view.job_id
        live = await reader.read_record(q.redis, q.partition(view.target), view.job_id)
        assert remembered == live, view.job_id
