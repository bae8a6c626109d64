"""The circuit breaker (SPEC "Circuit breaker"): one per process around every Redis
call; ``failureThreshold`` consecutive failures open it, an authentication error
opens it at once, and after ``resetTimeoutSeconds`` one probe decides.

The conftest's autouse fixture resets the process's ``BREAKER`` around each test.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from _redis_server import RedisServer, free_port, redis_server

import agentq
from agentq.eventlog.breaker import BREAKER
from agentq.schemas.config import Config

# A well-formed job id (for agent "a") that no test creates.
MISSING_JOB = "j_01ARZ3NDEKTSV4RRFFQ69G5FAV.a"
# A call the breaker lets through takes at least this long against the slow server
# below; a call it refuses must take far less.
SLOW = 0.4
AT_ONCE = 0.1


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTQ_")}
    env.update(extra)
    return env


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentq.cli", *args],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )


class SlowCloser:
    """A TCP server that accepts a connection, says nothing for ``delay`` seconds and
    hangs up: every Redis call against it fails, and takes ``delay`` to do so."""

    def __init__(self, delay: float = SLOW) -> None:
        self.delay = delay
        self.accepted = 0
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.05)
        self.port: int = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            thread = threading.Thread(target=self._hang_up, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _hang_up(self, conn: socket.socket) -> None:
        self._stop.wait(self.delay)
        conn.close()

    def __enter__(self) -> SlowCloser:
        thread = threading.Thread(target=self._serve, daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self._sock.close()


@pytest.fixture
def slow_server() -> Iterator[SlowCloser]:
    with SlowCloser() as server:
        yield server


async def _fails(q: agentq.Client) -> tuple[agentq.Unavailable, float]:
    """One Redis call that must fail with ``unavailable``: the error and how long it took."""
    started = time.monotonic()
    with pytest.raises(agentq.Unavailable) as caught:
        await q.status(MISSING_JOB)
    return caught.value, time.monotonic() - started


# -- a server that is not there -----------------------------------------------


def test_closed_port_exits_6_within_the_timeout(make_config: Callable[..., Config]) -> None:
    port = free_port()
    env = _clean_env(AGENTQ_KEY_PREFIX=make_config().key_prefix)
    started = time.monotonic()
    result = _cli("status", MISSING_JOB, "--redis", f"redis://127.0.0.1:{port}", "--json",
                  env=env)
    elapsed = time.monotonic() - started
    assert elapsed < 10, elapsed
    assert result.returncode == 6, (result.stdout, result.stderr)
    error = json.loads(result.stdout)["error"]
    assert error["code"] == "unavailable"
    assert f"127.0.0.1:{port}" in error["message"]
    assert "running" in error["message"]  # says what to check
    assert error["message"] in result.stderr


# -- consecutive failures -----------------------------------------------------


async def test_threshold_failures_open_the_breaker_and_later_calls_fail_at_once(
    make_config: Callable[..., Config], slow_server: SlowCloser
) -> None:
    config = make_config(circuitBreaker={"failureThreshold": 3, "resetTimeoutSeconds": 30})
    async with agentq.connect(slow_server.url, config) as q:
        for failure in range(1, 4):
            assert BREAKER.state == "closed", failure
            error, took = await _fails(q)
            assert took >= SLOW * 0.8, (failure, took)  # it really went to the server
            assert "open" not in error.message
            assert BREAKER.failures == failure
        assert BREAKER.state == "open"
        tried = slow_server.accepted

        for _ in range(3):
            error, took = await _fails(q)
            assert took < AT_ONCE, took
            assert "circuit breaker open" in error.message
            assert error.code == "unavailable"
        assert slow_server.accepted == tried  # no connection was even attempted

        # The tools give the same refusal as an error object.
        out = await agentq.tools.queue_status(q, "main", {"jobId": MISSING_JOB})
        assert out["error"]["code"] == "unavailable"
        assert "circuit breaker open" in out["error"]["message"]


async def test_a_success_resets_the_count_of_consecutive_failures(
    redis_url: str, make_config: Callable[..., Config]
) -> None:
    port = free_port()
    config = make_config(circuitBreaker={"failureThreshold": 2, "resetTimeoutSeconds": 30})
    async with agentq.connect(f"redis://127.0.0.1:{port}/0", config) as down:
        await _fails(down)
    assert (BREAKER.state, BREAKER.failures) == ("closed", 1)
    async with agentq.connect(redis_url, config) as up:
        with pytest.raises(agentq.NotFound):  # Redis answered
            await up.status(MISSING_JOB)
    assert (BREAKER.state, BREAKER.failures) == ("closed", 0)
    async with agentq.connect(f"redis://127.0.0.1:{port}/0", config) as down:
        await _fails(down)
        assert BREAKER.state == "closed"
        await _fails(down)
        assert BREAKER.state == "open"


# -- authentication errors ------------------------------------------------------


@pytest.fixture(scope="module")
def password_server() -> Iterator[RedisServer]:
    with redis_server(["--requirepass", "s3cret"]) as server:
        yield server


async def test_wrong_password_opens_the_breaker_at_once(
    password_server: RedisServer, make_config: Callable[..., Config]
) -> None:
    config = make_config(redis={"password": "wrong"},
                         circuitBreaker={"failureThreshold": 5, "resetTimeoutSeconds": 30})
    async with agentq.connect(password_server.url, config) as q:
        error, _ = await _fails(q)
        assert BREAKER.state == "open"
        assert BREAKER.failures == 1  # one failure, not five
        assert "credentials" in error.message
        assert "redis.password" in error.message
        assert password_server.url in error.message

        again, took = await _fails(q)
        assert took < AT_ONCE, took
        assert "circuit breaker open" in again.message


async def test_missing_password_opens_the_breaker_at_once(
    password_server: RedisServer, make_config: Callable[..., Config]
) -> None:
    config = make_config(circuitBreaker={"failureThreshold": 5, "resetTimeoutSeconds": 30})
    async with agentq.connect(password_server.url, config) as q:
        error, _ = await _fails(q)  # NOAUTH
        assert (BREAKER.state, BREAKER.failures) == ("open", 1)
        assert "credentials" in error.message


async def test_right_password_works(
    password_server: RedisServer, make_config: Callable[..., Config]
) -> None:
    config = make_config(redis={"password": "s3cret"})
    async with agentq.connect(password_server.url, config) as q:
        await q.add_agent("a")
        job = await q.dispatch("a", "hello")
        assert (await q.status(job.job_id)).state == "queued"
    assert BREAKER.state == "closed"


def test_wrong_password_through_the_cli_exits_6_naming_the_credentials(
    password_server: RedisServer, make_config: Callable[..., Config]
) -> None:
    env = _clean_env(AGENTQ_KEY_PREFIX=make_config().key_prefix,
                     AGENTQ_REDIS__PASSWORD="wrong")
    result = _cli("agents", "list", "--redis", password_server.url, "--json", env=env)
    assert result.returncode == 6, (result.stdout, result.stderr)
    error = json.loads(result.stdout)["error"]
    assert error["code"] == "unavailable"
    assert "credentials" in error["message"]
    assert "AGENTQ_REDIS__PASSWORD" in error["message"]


# -- recovery -----------------------------------------------------------------


async def test_recovers_after_the_reset_timeout(make_config: Callable[..., Config]) -> None:
    reset = 1.5
    port = free_port()
    config = make_config(circuitBreaker={"failureThreshold": 2, "resetTimeoutSeconds": reset})
    async with agentq.connect(f"redis://127.0.0.1:{port}/0", config) as q:
        await _fails(q)
        await _fails(q)
        assert BREAKER.state == "open"

        # After the reset timeout one probe goes through; while Redis is still down it
        # fails, and that one failure opens the breaker again.
        await asyncio.sleep(reset + 0.1)
        assert BREAKER.state == "half-open"
        error, _ = await _fails(q)
        assert "circuit breaker open" not in error.message  # it was tried
        assert BREAKER.state == "open"

        server = RedisServer(port=port).start()
        try:
            opened = time.monotonic()
            # Redis is back, but the breaker does not try it before the reset timeout.
            error, took = await _fails(q)
            assert took < AT_ONCE
            assert "circuit breaker open" in error.message

            await asyncio.sleep(max(0.0, reset + 0.1 - (time.monotonic() - opened)))
            with pytest.raises(agentq.NotFound):  # the probe reached Redis
                await q.status(MISSING_JOB)
            assert (BREAKER.state, BREAKER.failures) == ("closed", 0)

            await q.add_agent("a")
            job = await q.dispatch("a", "after the outage")
            view: Any = await q.status(job.job_id)
            assert view.state == "queued"
        finally:
            server.cleanup()


async def test_half_open_lets_one_probe_through_and_refuses_the_rest(
    make_config: Callable[..., Config], slow_server: SlowCloser
) -> None:
    reset = 0.5
    config = make_config(circuitBreaker={"failureThreshold": 1, "resetTimeoutSeconds": reset})
    async with agentq.connect(slow_server.url, config) as q:
        await _fails(q)
        assert BREAKER.state == "open"
        await asyncio.sleep(reset + 0.05)
        assert BREAKER.state == "half-open"
        tried = slow_server.accepted

        outcomes = await asyncio.gather(*(_fails(q) for _ in range(5)))
        probes = [took for error, took in outcomes if "circuit breaker open" not in error.message]
        refused = [took for error, took in outcomes if "circuit breaker open" in error.message]
        # One call is the probe and goes to the server; the others fail at once.
        assert len(probes) == 1, outcomes
        assert probes[0] >= SLOW * 0.8
        assert all(took < AT_ONCE for took in refused), refused
        assert slow_server.accepted == tried + 1
        assert BREAKER.state == "open"  # the probe failed
