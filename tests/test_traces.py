"""OpenTelemetry traces (issue 16, item 2), over real processes: a traced CLI
dispatches, a traced `agentq worker --exec` runs the job, whose command
dispatches a child with the traced CLI. Each process records its spans with
the SDK's in-memory exporter (tests/otel_proc.py) and writes them out when it
exits; together they must make one trace, linked as the messaging semantic
conventions say."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import agentq

AGENT = "tr"
ROOT = Path(__file__).resolve().parent.parent
TRACED = [sys.executable, str(ROOT / "tests" / "otel_proc.py")]
# "parent" dispatches a child from inside its handler (the traced CLI, which
# reads TRACEPARENT); "flaky" fails its first attempt; every job's result is
# the TRACEPARENT its command saw.
HANDLER = (
    't=$(cat); '
    'if [ "$t" = parent ]; then ' + " ".join(TRACED) + ' dispatch tr child >/dev/null '
    '|| exit 1; fi; '
    'if [ "$t" = flaky ] && [ ! -e "$FLAG" ]; then touch "$FLAG"; exit 1; fi; '
    'echo "$TRACEPARENT"'
)


def _env(q: agentq.Client, redis_url: str, spans: Path, flag: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AGENTQ_") and k != "TRACEPARENT"}
    env.update(AGENTQ_KEY_PREFIX=q.config.key_prefix, AGENTQ_REDIS_URL=redis_url,
               AGENTQ_JOBS__BACKOFF_BASE_SECONDS="0",
               AGENTQ_RATE_LIMIT__DISPATCHES_PER_MINUTE="0",
               AGENTQ_TEST_SPANS=str(spans), FLAG=str(flag))
    return env


async def _traced_dispatch(env: dict[str, str], *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        *TRACED, "--json", "dispatch", AGENT, *args, cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err.decode()
    return str(json.loads(out)["jobId"])


def _spans(folder: Path) -> list[dict[str, Any]]:
    return [span for path in sorted(folder.glob("*.json"))
            for span in json.loads(path.read_text())]


def _ids(traceparent: object) -> str:
    """A traceparent without its flags: version, trace id and span id."""
    assert isinstance(traceparent, str), traceparent
    return traceparent.rsplit("-", 1)[0]


def _traceparent(span: dict[str, Any]) -> str:
    return f"00-{span['trace']}-{span['span']}"


async def test_one_trace_from_dispatch_through_a_handler_that_dispatches(
    worker_client: Callable[..., Awaitable[agentq.Client]], redis_url: str, tmp_path: Path,
) -> None:
    q = await worker_client()
    await q.add_agent(AGENT)
    spans_dir = tmp_path / "spans"
    spans_dir.mkdir()
    env = _env(q, redis_url, spans_dir, tmp_path / "flaked")
    worker = await asyncio.create_subprocess_exec(
        *TRACED, "worker", AGENT, "--exec", HANDLER, "--concurrency", "2", "--quiet",
        cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE)
    try:
        parent_id = await _traced_dispatch(env, "parent")
        flaky_id = await _traced_dispatch(env, "flaky", "--depends-on", parent_id,
                                          "--max-attempts", "2")
        for job_id in (parent_id, flaky_id):
            view, timed_out = await q.wait(job_id, timeout=30)
            assert not timed_out and view.state == "completed", view
        (child,) = [j for j in (await q.list(agent=AGENT, limit=10)).jobs
                    if j.parent_job_id == parent_id]
        child_view, timed_out = await q.wait(child.job_id, timeout=30)
        assert not timed_out and child_view.state == "completed", child_view
        # A dependent of a job that has already ended: released as the gates
        # register it, with a release span all the same.
        late_id = await _traced_dispatch(env, "late", "--depends-on", parent_id)
        view, timed_out = await q.wait(late_id, timeout=30)
        assert not timed_out and view.state == "completed", view
    finally:
        worker.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(worker.communicate(), 20)
    assert worker.returncode == 0, err.decode()
    spans = _spans(spans_dir)

    def one(name: str, job_id: str, **attributes: Any) -> dict[str, Any]:
        found = [s for s in spans if s["name"] == name
                 and s["attributes"].get("messaging.message.id") == job_id
                 and all(s["attributes"].get(k) == v for k, v in attributes.items())]
        assert len(found) == 1, (name, job_id, attributes, spans)
        return found[0]

    send_parent = one("send tr", parent_id)
    process_parent = one("process tr", parent_id)
    send_child = one("send tr", child.job_id)
    process_child = one("process tr", child.job_id)

    # One trace: dispatch -> run -> the handler's dispatch -> the child's run.
    assert len({s["trace"] for s in (send_parent, process_parent, send_child,
                                     process_child)}) == 1
    assert send_parent["parent"] is None
    assert process_parent["parent"] == send_parent["span"]
    assert process_parent["links"] == [send_parent["span"]]
    assert send_child["parent"] == process_parent["span"]
    assert process_child["parent"] == send_child["span"]
    assert process_child["links"] == [send_child["span"]]
    # The command saw its attempt's span as TRACEPARENT.
    assert _ids((await q.status(parent_id)).result) == _traceparent(process_parent)
    assert _ids(child_view.result) == _traceparent(process_child)

    # Messaging conventions.
    for send in (send_parent, send_child):
        assert send["kind"] == "PRODUCER"
        assert send["attributes"]["messaging.system"] == "agentq"
        assert send["attributes"]["messaging.destination.name"] == AGENT
        assert send["attributes"]["messaging.operation.type"] == "send"
    for process in (process_parent, process_child):
        assert process["kind"] == "CONSUMER"
        assert process["attributes"]["messaging.operation.type"] == "process"
        assert process["attributes"]["messaging.consumer.group.name"] == "workers"
        assert process["attributes"]["agentq.outcome"] == "completed"
        assert process["status"] == "UNSET"

    # The traceparent travels in the job's JobDispatched.
    (dispatched, *_) = await q.history(parent_id)
    assert _ids(dispatched.data["traceparent"]) == _traceparent(send_parent)

    # A retry: two process spans under the same send, the first failed.
    send_flaky = one("send tr", flaky_id)
    first = one("process tr", flaky_id, **{"agentq.attempt": 1})
    second = one("process tr", flaky_id, **{"agentq.attempt": 2})
    assert first["parent"] == second["parent"] == send_flaky["span"]
    assert first["status"] == "ERROR" and first["attributes"]["error.type"] == "handler_failed"
    assert first["attributes"]["agentq.outcome"] == "retrying"
    assert first["events"] == ["retry scheduled"]
    assert second["attributes"]["agentq.outcome"] == "completed"
    # Its release by the parent's completion: a span in its trace, linked to the parent's.
    late = one("release tr", late_id)
    assert late["parent"] == one("send tr", late_id)["span"]
    assert late["links"] == [send_parent["span"]]
    assert late["attributes"]["agentq.dependency.id"] == parent_id
    release = one("release tr", flaky_id)
    assert release["parent"] == send_flaky["span"]
    assert release["links"] == [send_parent["span"]]
    assert release["attributes"]["agentq.dependency.id"] == parent_id
    assert release["attributes"]["agentq.outcome"] == "queued"
    parent_done = next(e for e in await q.history(parent_id) if e.type == "JobCompleted")
    assert release["start"] // 1000 == _micros(parent_done.at)
    assert release["end"] <= first["start"]


def _micros(iso: str) -> int:
    from agentq.schemas._base import iso_to_micros

    return iso_to_micros(iso)


def test_without_opentelemetry_nothing_changes() -> None:
    """With OpenTelemetry not installed (its imports fail), agentq imports and its
    dispatch and worker paths record nothing; agentq itself imports none of it
    (redis-py does, for its own metrics, when the SDK is installed)."""
    code = (
        "import sys\n"
        "class Absent:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'opentelemetry':\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Absent())\n"
        "import agentq, agentq.cli, agentq.consumers.worker, agentq._dispatching\n"
        "from agentq.eventlog import tracing\n"
        "assert tracing.tracer() is None and tracing.start_sends([('a', 'j')]) is None\n"
        "assert tracing.start_process('a', 'j', 1, None, 'w') is None\n"
        "with tracing.current(None):\n"
        "    assert tracing.handler_traceparent(None) is None\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRACEPARENT"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True).stdout
    assert out.strip() == "[]"


def test_a_trace_crosses_a_process_without_a_tracer() -> None:
    """No provider, but TRACEPARENT in the environment (a handler's command): the
    dispatch carries it as it is, so the trace goes on past this process."""
    from agentq.eventlog import tracing

    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    env = {**os.environ, "TRACEPARENT": parent}
    code = ("from agentq.eventlog import tracing\n"
            "print(tracing.start_sends([('a', 'j1'), ('b', 'j2')]).traceparents)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True).stdout
    assert out.strip() == repr([parent, parent])
    # ...and a job's stored traceparent reaches its handler the same way.
    assert tracing.handler_traceparent(parent) == parent
    assert tracing.handler_traceparent("not a traceparent") is None
