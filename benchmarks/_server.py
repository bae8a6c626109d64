"""A throwaway ``redis-server`` for benchmarks.

    with throwaway_redis() as url:
        ...  # url is "redis://127.0.0.1:<port>/0"

The server listens on a free loopback port, keeps nothing on disk (``--save ""
--appendonly no``), works in a temporary directory and is stopped by its pid
when the block exits, also on an error or KeyboardInterrupt. It runs in a
session of its own, so a Ctrl-C in the terminal reaches only the benchmark,
which then stops the server itself.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["ServerError", "machine_info", "redis_server_version", "server", "throwaway_redis"]

_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 10.0
_PORT_ATTEMPTS = 5


class ServerError(RuntimeError):
    """The throwaway server could not be started; the message says why."""


def _binary(binary: str | None) -> str:
    name = binary or os.environ.get("REDIS_SERVER") or "redis-server"
    found = shutil.which(name)
    if found is None:
        raise ServerError(f"{name!r} is not on PATH (set REDIS_SERVER to its path)")
    return found


def redis_server_version(binary: str | None = None) -> str:
    """The first line of ``redis-server --version``."""
    out = subprocess.run(
        [_binary(binary), "--version"], capture_output=True, text=True, check=True, timeout=10
    )
    return out.stdout.strip()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _log_tail(log: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the server we started, by its pid: SIGTERM, then SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=_STOP_TIMEOUT)


def _start(binary: str, workdir: Path, extra: list[str]) -> tuple[subprocess.Popen[bytes], int]:
    log = workdir / "redis.log"
    last_error = ""
    for _ in range(_PORT_ATTEMPTS):
        port = _free_port()
        argv = [
            binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(workdir),
            "--logfile", str(log),
            "--daemonize", "no",
            "--protected-mode", "yes",
            *extra,
        ]  # fmt: skip
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + _START_TIMEOUT
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    break
                if _answers_ping(port):
                    return proc, port
                time.sleep(0.02)
        except BaseException:
            _stop(proc)
            raise
        _stop(proc)
        # Most likely someone took the port between our probe and the bind: try another.
        last_error = _log_tail(log)
    raise ServerError(f"redis-server did not start after {_PORT_ATTEMPTS} attempts:\n{last_error}")


@contextlib.contextmanager
def throwaway_redis(
    *, binary: str | None = None, extra_args: list[str] | None = None
) -> Iterator[str]:
    """Start a private redis-server on a free loopback port; yield its URL; stop it.

    ``binary`` defaults to ``$REDIS_SERVER`` or ``redis-server`` on PATH;
    ``extra_args`` are appended to its command line (e.g. ``["--io-threads", "2"]``).
    """
    exe = _binary(binary)
    workdir = Path(tempfile.mkdtemp(prefix="agentq-bench-redis-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        proc, port = _start(exe, workdir, list(extra_args or []))
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


def machine_info() -> dict[str, Any]:
    """The machine and the client libraries, for a results file."""
    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "redis_py": version("redis"),
        "hiredis": version("hiredis"),
        "agentq": version("agentq"),
    }
    with contextlib.suppress(OSError):
        info["loadavg"] = list(os.getloadavg())
    return info


@contextlib.contextmanager
def server(url: str | None) -> Iterator[str]:
    """``url`` when given, else a throwaway server's (stopped at the end)."""
    if url:
        yield url
    else:
        with throwaway_redis() as started:
            yield started
