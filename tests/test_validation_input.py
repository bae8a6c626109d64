"""Input that must be refused as ``invalid_input`` with the field's path, never
stored, never rewritten, and never raised out of a tool (issue 11 items 5 and 14):

- callers and agent ids anywhere (a tool's caller, ``queue_activity``'s agents,
  the CLI's ``activity`` and ``mcp --agent``, the config's agents and lists of
  agents) follow SPEC's agent id;
- non-finite numbers, integers beyond 64 bits and lone surrogates anywhere in a
  tool's input (``metadata`` and ``origin`` included, the caller too);
- a job stored with a null ``timeoutSeconds`` by an older version still reads.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import pytest

import agentq
from agentq import tools
from agentq.config import load_config, validate
from agentq.schemas.config import Config
from agentq.schemas.errors import InvalidInput
from agentq.schemas.tools import DispatchInput

MakeConfig = Callable[..., Config]
LONE = "\ud800"  # a lone surrogate: no UTF-8 encodes it


@pytest.fixture
async def q(redis_url: str, make_config: MakeConfig) -> AsyncIterator[agentq.Client]:
    config = make_config(rateLimit={"dispatchesPerMinute": 0, "maxQueueDepth": 0})
    async with agentq.connect(redis_url, config) as client:
        for agent in ("a", "b"):
            await client.add_agent(agent)
        yield client


def invalid(out: dict[str, Any], path: str) -> str:
    """The message of an ``invalid_input`` error object naming ``path``."""
    assert set(out) == {"error"}, out
    assert out["error"]["code"] == "invalid_input", out
    message: str = out["error"]["message"]
    assert message.startswith(f"Invalid input: {path}: "), message
    return message


async def log_len(q: agentq.Client) -> int:
    return sum([await q.redis.xlen(q.partition(agent).log) for agent in ("a", "b")])


# -- item 5: callers and agent ids -----------------------------------------------------


BAD_IDS = ["Bad Caller!", "UPPER", "x y", "", "-lead", "a" * 65, "a\n", "é", LONE]


@pytest.mark.parametrize("caller", BAD_IDS)
async def test_a_tool_refuses_a_caller_that_is_no_agent_id(q: agentq.Client, caller: str) -> None:
    job = await q.dispatch("b", "x", caller="a")
    before = await log_len(q)
    calls = {
        "queue_dispatch": {"target": "b", "task": "x"},
        "queue_status": {"jobId": job.job_id},
        "queue_list": {},
        "queue_activity": {},
        "queue_wait": {"jobId": job.job_id, "timeoutSeconds": 1},
        "queue_history": {"jobId": job.job_id},
    }
    for name, params in calls.items():
        invalid(await tools.TOOLS[name](q, caller, params), "caller")
    assert await log_len(q) == before
    with pytest.raises(InvalidInput) as raised:
        await q.cancel(job.job_id, caller=caller)
    assert raised.value.path == "caller"
    # Nothing was stored as dispatched by it.
    assert (await q.list(caller="main")).count == 1


async def test_replay_and_drain_refuse_agent_ids_that_are_no_agent_ids(q: agentq.Client) -> None:
    with pytest.raises(InvalidInput) as raised:
        [e async for e in q.replay(["a", "Bad!"])]
    assert raised.value.path == "agents.1"
    with pytest.raises(InvalidInput) as raised:
        await q.drain("Bad!")
    assert raised.value.path == "agent"


async def test_activity_refuses_agent_ids_that_are_no_agent_ids(q: agentq.Client) -> None:
    invalid(await tools.queue_activity(q, "a", {"agents": ["a", "BAD!"]}), "agents.1")
    with pytest.raises(InvalidInput) as raised:
        await q.activity(["BAD!"])
    assert raised.value.path == "agents.0"
    out = await tools.queue_activity(q, "main", {"agents": ["a"]})
    assert set(out["agents"]) == {"a"}


def _cli(redis_url: str, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTQ_")}
    env.update(AGENTQ_KEY_PREFIX=prefix, AGENTQ_RATE_LIMIT__DISPATCHES_PER_MINUTE="0")
    return subprocess.run([sys.executable, "-m", "agentq.cli", *args, "--redis", redis_url,
                           "--json"], capture_output=True, text=True, env=env, timeout=60,
                          stdin=subprocess.DEVNULL, check=False)


def test_cli_refuses_bad_agent_ids_and_infinite_numbers(
    redis_url: str, make_config: MakeConfig
) -> None:
    prefix = make_config().key_prefix
    commands = {
        "activity": ("activity", "Bad!"),
        "mcp": ("mcp", "--agent", "x y"),
        "timeout": ("dispatch", "a", "task", "--timeout", "inf"),
        "nan": ("dispatch", "a", "task", "--delay", "nan"),
    }
    with ThreadPoolExecutor(len(commands)) as pool:
        results = dict(zip(commands, pool.map(lambda a: _cli(redis_url, prefix, *a),
                                              commands.values()), strict=True))
    for name, result in results.items():
        assert result.returncode == 2, (name, result.stdout, result.stderr)
        body = json.loads(result.stdout)
        assert body["error"]["code"] == "invalid_input", (name, body)
        assert "Traceback" not in result.stderr, result.stderr
    assert "x y" in results["mcp"].stderr and "Bad!" in results["activity"].stderr
    # Refused by the tool's input check, or earlier by the command line's own.
    assert any(name in results["timeout"].stderr for name in ("timeoutSeconds", "--timeout"))


@pytest.mark.parametrize(("config", "path"), [
    ({"agents": {"Researcher": {}}}, "agents.Researcher"),
    ({"agents": {"writer": {"allowAgents": ["Editor"]}}}, "agents.writer.allowAgents.0"),
    ({"auth": {"systemAgents": ["Main"]}}, "auth.systemAgents.0"),
])
def test_config_refuses_agent_ids_that_are_no_agent_ids(
    config: dict[str, Any], path: str
) -> None:
    with pytest.raises(InvalidInput) as raised:
        validate(config)
    assert raised.value.path is not None and raised.value.path.startswith(path), raised.value
    validate({"agents": {"writer": {"allowAgents": ["*", "editor"]}}})  # "*" is any


def test_config_file_with_an_upper_case_agent_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "agentq.json"
    file.write_text(json.dumps({"agents": {"Researcher": {"concurrency": 2}}}))
    with pytest.raises(InvalidInput, match="Researcher"):
        load_config(file, environ={})


# -- item 14: numbers and text JSON cannot carry --------------------------------------


POISON = [
    ({"timeoutSeconds": math.inf}, "timeoutSeconds"),
    ({"timeoutSeconds": math.nan}, "timeoutSeconds"),
    ({"delaySeconds": -math.inf}, "delaySeconds"),
    ({"maxAttempts": 2**64}, "maxAttempts"),
    ({"metadata": {"n": [1, math.inf]}}, "metadata.n.1"),
    ({"metadata": {"n": 2**64}}, "metadata.n"),
    ({"metadata": {"n": -(2**63) - 1}}, "metadata.n"),
    ({"metadata": {"deep": {"x": math.nan}}}, "metadata.deep.x"),
    ({"metadata": {LONE: 1}}, "metadata.\\ud800"),  # the path escapes it
    ({"origin": {"threadId": 10**30}}, "origin.threadId"),
    ({"origin": {"channel": "chat" + LONE}}, "origin.channel"),
    ({"task": "hello " + LONE}, "task"),
    ({"label": LONE}, "label"),
    ({"sessionKey": LONE}, "sessionKey"),
    ({"idempotencyKey": "k" + LONE}, "idempotencyKey"),
    ({"dependsOn": [LONE]}, "dependsOn.0"),
]


@pytest.mark.parametrize(("fields", "path"), POISON)
async def test_dispatch_refuses_what_json_cannot_carry(
    q: agentq.Client, fields: dict[str, Any], path: str
) -> None:
    before = await log_len(q)
    out = await tools.queue_dispatch(q, "a", {"target": "b", "task": "x", **fields})
    message = invalid(out, path)
    orjson.dumps(out)  # the error object itself is JSON
    assert LONE not in message
    assert await log_len(q) == before
    with pytest.raises(InvalidInput) as raised:  # built in Python, not parsed from JSON
        DispatchInput(**{"target": "b", "task": "x", **fields})
    assert raised.value.path == path
    # A batch names the item.
    with pytest.raises(InvalidInput) as raised:
        await q.dispatch_many([{"target": "b", "task": "ok"},
                               {"target": "b", "task": "x", **fields}], caller="a")
    assert raised.value.path == f"[1].{path}"
    assert await log_len(q) == before
    # The views still read.
    assert (await q.list(caller="main")).count == 0


@pytest.mark.parametrize(("tool", "params", "path"), [
    ("queue_status", {"jobId": "j_" + LONE}, "jobId"),
    ("queue_history", {"jobId": "j_" + LONE}, "jobId"),
    ("queue_wait", {"jobId": "j_x.a", "timeoutSeconds": math.inf}, "timeoutSeconds"),
    ("queue_wait", {"jobId": "j_x.a", "timeoutSeconds": math.nan}, "timeoutSeconds"),
    ("queue_list", {"limit": 2**70}, "limit"),
    ("queue_list", {"cursor": LONE}, "cursor"),
    ("queue_activity", {"agents": [LONE]}, "agents.0"),
])
async def test_read_tools_refuse_what_json_cannot_carry(
    q: agentq.Client, tool: str, params: dict[str, Any], path: str
) -> None:
    invalid(await tools.TOOLS[tool](q, "a", params), path)


async def test_a_tool_never_raises_on_a_caller_json_cannot_carry(q: agentq.Client) -> None:
    job = await q.dispatch("b", "x", caller="a")
    for name in tools.TOOLS:
        params = {} if name in ("queue_list", "queue_activity") else {"jobId": job.job_id}
        if name == "queue_dispatch":
            params = {"target": "b", "task": "x"}
        message = invalid(await tools.TOOLS[name](q, "a" + LONE, params), "caller")
        orjson.dumps(message)


async def test_finite_edges_are_accepted(q: agentq.Client) -> None:
    view = await q.dispatch("b", "x", caller="a", timeout_seconds=1e9,
                            metadata={"big": 2**64 - 1, "small": -(2**63), "f": 1.5e300,
                                      "text": "naïve ☃ 😀"})
    assert view.timeout_seconds == 1e9
    assert view.metadata == {"big": 2**64 - 1, "small": -(2**63), "f": 1.5e300,
                             "text": "naïve ☃ 😀"}
    assert (await q.status(view.job_id, caller="a")).metadata == view.metadata


async def test_a_job_stored_with_a_null_timeout_still_reads(q: agentq.Client) -> None:
    """An older version stored ``timeoutSeconds: inf`` as null: its views must read."""
    job = await q.dispatch("b", "x", caller="a")
    spec_key = q.partition("b").spec(job.job_id)
    spec = orjson.loads(await q.redis.get(spec_key))
    await q.redis.set(spec_key, orjson.dumps({**spec, "timeoutSeconds": None}))
    assert (await q.status(job.job_id)).timeout_seconds == 0
    assert [j.timeout_seconds for j in (await q.list(caller="main")).jobs] == [0]
    out = await tools.queue_status(q, "a", {"jobId": job.job_id})
    assert out["timeoutSeconds"] == 0
    # And it runs, as a job without a timeout.
    worker = q.worker("b", lambda job: f"ran {job.view.timeout_seconds}", background=False)
    running = asyncio.create_task(worker.run())
    try:
        view, timed_out = await q.wait(job.job_id, timeout=20)
    finally:
        worker.stop()
        await running
    assert (view.state, view.result, timed_out) == ("completed", "ran 0.0", False)


ODD_VALUES: list[Any] = [None, True, -1, 0, 2**64, -(2**70), 1e308, math.inf, math.nan, "",
                         "x" * 60_000, "\x00", LONE, [], [LONE], [math.nan], {}, {"a": math.inf},
                         {LONE: 1}, {"a": {"b": [2**65]}}]


async def test_no_tool_raises_whatever_one_parameter_holds(q: agentq.Client) -> None:
    """Every tool, every parameter, a value of every odd kind: the answer is a JSON
    object (a view or an error object), never an exception."""
    job = await q.dispatch("b", "x", caller="a")
    base: dict[str, dict[str, Any]] = {
        "queue_dispatch": {"target": "b", "task": "x"},
        "queue_status": {"jobId": job.job_id},
        "queue_list": {},
        "queue_activity": {},
        "queue_wait": {"jobId": job.job_id, "timeoutSeconds": 1},
        "queue_history": {"jobId": job.job_id},
    }
    for name, model in _inputs().items():
        for field in model.model_fields.values():
            alias = field.alias or ""
            for value in ODD_VALUES:
                params = {**base[name], alias: value}
                out = await tools.TOOLS[name](q, "a", params)
                assert isinstance(out, dict), (name, alias, value)
                orjson.dumps(out)  # JSON, whatever came in
                if value in (math.inf, LONE, 2**64) and set(out) == {"error"}:
                    assert out["error"]["code"] == "invalid_input", (name, alias, out)


def _inputs() -> dict[str, Any]:
    from agentq.schemas import tools as models

    return {"queue_dispatch": models.DispatchInput, "queue_status": models.StatusInput,
            "queue_list": models.ListInput, "queue_activity": models.ActivityInput,
            "queue_wait": models.WaitInput, "queue_history": models.HistoryInput}


@pytest.mark.parametrize("environ", [{}, {"AGENTQ_JOBS__TIMEOUT_SECONDS": "Infinity"}])
def test_config_refuses_non_finite_numbers(tmp_path: Path, environ: dict[str, str]) -> None:
    file = tmp_path / "agentq.toml"
    file.write_text("[jobs]\ntimeoutSeconds = inf\n" if not environ else "")
    with pytest.raises(InvalidInput) as raised:
        load_config(file, environ=environ)
    assert raised.value.path == "jobs.timeoutSeconds"


async def test_metadata_nested_deeper_than_json_is_written_is_refused(q: agentq.Client) -> None:
    deep: dict[str, Any] = {}
    inner = deep
    for _ in range(300):
        inner["d"] = {}
        inner = inner["d"]
    out = await tools.queue_dispatch(q, "a", {"target": "b", "task": "x", "metadata": deep})
    assert out["error"]["code"] == "invalid_input"
    assert "nested more than 255 levels deep" in out["error"]["message"]
    assert out["error"]["message"].startswith("Invalid input: metadata.d.d.")
