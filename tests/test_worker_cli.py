"""`agentq worker` as a process (issue 12 item 7): a line per ended job at the default
level, `--quiet` to silence them, a summary line at exit; --concurrency bounded
like the config's (1 to 1,000), checked before anything runs."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

import agentq

AGENT = "w"
ROOT = Path(__file__).resolve().parent.parent


def _env(q: agentq.Client, redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTQ_")}
    env.update(AGENTQ_KEY_PREFIX=q.config.key_prefix, AGENTQ_REDIS_URL=redis_url)
    return env


async def _run_worker(q: agentq.Client, redis_url: str, *flags: str) -> tuple[list[str], str]:
    """Run `agentq worker` over two jobs (one fails), stop it, return its stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agentq.cli", "worker", AGENT, "--exec",
        'if [ "$(cat)" = bad ]; then echo broken >&2; exit 1; fi; echo fine', *flags,
        cwd=ROOT, env=_env(q, redis_url), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        good = await q.dispatch(AGENT, "good")
        bad = await q.dispatch(AGENT, "bad", max_attempts=1)
        for job in (good, bad):
            view, timed_out = await q.wait(job.job_id, timeout=20)
            assert not timed_out, view
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 15)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    return [good.job_id, bad.job_id], err.decode()


async def test_worker_prints_a_line_per_ended_job_and_a_summary(
    worker_client: Callable[..., Awaitable[agentq.Client]], redis_url: str
) -> None:
    q = await worker_client()
    (good, bad), err = await _run_worker(q, redis_url)
    lines = err.splitlines()
    assert any(line.startswith(f"job {good} completed in ") and line.endswith("(attempt 1)")
               for line in lines), err
    assert any(line.startswith(f"job {bad} failed in ") and "(attempt 1): broken" in line
               for line in lines), err
    assert lines[-1].startswith("stopped after ")
    assert lines[-1].endswith("2 jobs ended (1 completed, 1 failed)"), lines[-1]


async def test_worker_quiet_prints_only_the_summary(
    worker_client: Callable[..., Awaitable[agentq.Client]], redis_url: str
) -> None:
    q = await worker_client()
    _, err = await _run_worker(q, redis_url, "--quiet")
    assert not [line for line in err.splitlines() if line.startswith("job ")], err
    assert err.splitlines()[-1].endswith("2 jobs ended (1 completed, 1 failed)"), err


@pytest.mark.parametrize("concurrency", ["0", "1001"])
def test_worker_concurrency_outside_1_to_1000_is_refused(concurrency: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTQ_")}
    # An unreachable server: the refusal comes before any connection.
    env["AGENTQ_REDIS_URL"] = "redis://127.0.0.1:1/0"
    done = subprocess.run(
        [sys.executable, "-m", "agentq.cli", "worker", AGENT, "--exec", "true",
         "--concurrency", concurrency],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=30, check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "--concurrency must be from 1 to 1000" in done.stderr
    assert "running (" not in done.stderr  # no banner before the refusal


def test_worker_refuses_a_bad_agent_id_before_its_banner() -> None:
    """Issue 12 item 5: the id is validated first; nothing connects or prints a
    banner for an id that can never be served."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTQ_")}
    env["AGENTQ_REDIS_URL"] = "redis://127.0.0.1:1/0"
    done = subprocess.run(
        [sys.executable, "-m", "agentq.cli", "worker", "NewAgent", "--exec", "true"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=30, check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "NewAgent" in done.stderr and "agent id" in done.stderr
    assert "running (" not in done.stderr
