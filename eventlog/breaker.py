"""The circuit breaker: one per process, around every Redis call.

``failure_threshold`` consecutive failures open it; while open, calls fail at
once for ``reset_timeout`` seconds; then one call is let through as a probe,
and its outcome closes or re-opens the breaker. An authentication error opens
it at once: retrying a wrong password only locks the account out faster.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, ClassVar

from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

_AUTH_MARKERS = ("NOAUTH", "WRONGPASS", "ERR AUTH", "invalid password", "invalid username")


class CircuitOpen(RedisConnectionError):
    """Raised instead of calling Redis while the breaker is open."""


class Breaker:
    def __init__(self, failure_threshold: int = 5, reset_timeout: float = 30.0) -> None:
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout
        self.failures = 0
        self.opened_at: float | None = None
        self.last_error = ""
        # Every failed call since the process started (agentq_redis_errors_total).
        self.errors = 0
        # The task whose call is the half-open probe, and when it began: one probe
        # at a time; one that never reports (its task was cancelled) is replaced
        # after another reset timeout.
        self._prober: asyncio.Task[Any] | None = None
        self._probe_started = 0.0

    def configure(self, failure_threshold: int, reset_timeout: float) -> None:
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half-open" if self._probe_due() else "open"

    def _probe_due(self) -> bool:
        opened = self.opened_at
        return opened is not None and time.monotonic() - opened >= self.reset_timeout

    def before_call(self) -> None:
        """Raise CircuitOpen unless a call may go ahead. Once the reset timeout has
        passed (half-open), one task's call goes ahead as the probe (its connect,
        send and read all pass) and the others are refused until it decides."""
        if self.opened_at is None:
            return
        now = time.monotonic()
        if self._probe_due():
            task = _current_task()
            if self._prober is not None and self._prober is task:
                return
            if self._prober is None or now - self._probe_started >= self.reset_timeout:
                self._prober, self._probe_started = task, now
                return
            raise CircuitOpen(
                f"circuit breaker open after {self.failures} failed Redis calls "
                f"(last: {self.last_error}); a probe call is deciding"
            )
        left = max(0.0, self.reset_timeout - (now - self.opened_at))
        raise CircuitOpen(
            f"circuit breaker open after {self.failures} failed Redis calls "
            f"(last: {self.last_error}); next try in {left:.0f}s"
        )

    def succeeded(self) -> None:
        self.failures = 0
        self.opened_at = None
        self._prober = None

    def failed(self, error: BaseException) -> None:
        """Count one failed call (each error once, however many layers it crosses)."""
        if getattr(error, "_agentq_counted", False):
            return
        error._agentq_counted = True  # type: ignore[attr-defined]
        self.failures += 1
        self.errors += 1
        self.last_error = str(error) or type(error).__name__
        half_open = self._probe_due()
        if is_auth_error(error) or self.failures >= self.failure_threshold or half_open:
            self.opened_at = time.monotonic()
            self._prober = None

    def reset(self) -> None:
        self.succeeded()


def _current_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # no running loop: a synchronous caller
        return None


def is_auth_error(error: BaseException) -> bool:
    return isinstance(error, AuthenticationError) or (
        isinstance(error, ResponseError) and any(m in str(error) for m in _AUTH_MARKERS)
    )


BREAKER = Breaker()
"""The process's breaker."""

_COUNTED = (RedisConnectionError, RedisTimeoutError, AuthenticationError, OSError)


def unsent(error: BaseException) -> bool:
    """Whether ``error`` was raised before the command reached Redis (refused by the
    breaker, or the connection could not be made): sending it again cannot run it twice."""
    return isinstance(error, CircuitOpen) or bool(getattr(error, "_agentq_unsent", False))


def _mark_unsent(error: BaseException) -> None:
    error._agentq_unsent = True  # type: ignore[attr-defined]


class _Guarded:
    """Mixin for a redis-py connection class: every command passes the breaker.

    A failure is counted once even when it passes through several of these
    methods (connecting can happen inside ``send_packed_command``). A failure to
    connect is marked (:func:`unsent`): nothing was sent.

    ``counts_failures`` False leaves the counting of connection failures to the
    caller: a cluster client retries a failed node for a while inside one call
    (a failover), and counts the call once when it gives up.
    """

    counts_failures: ClassVar[bool] = True

    async def connect(self) -> None:
        BREAKER.before_call()
        try:
            await super().connect()  # type: ignore[misc]
        except CircuitOpen:
            raise
        except (*_COUNTED, ResponseError) as exc:
            if not isinstance(exc, ResponseError):
                _mark_unsent(exc)
            if is_auth_error(exc) or (self.counts_failures and not isinstance(exc, ResponseError)):
                BREAKER.failed(exc)
            raise

    async def connect_check_health(self, *args: Any, **kwargs: Any) -> None:
        # Where a command's lazy connect goes (send_packed_command calls it, not
        # connect): a failure here means the command itself was never sent.
        try:
            await super().connect_check_health(*args, **kwargs)  # type: ignore[misc]
        except _COUNTED as exc:
            _mark_unsent(exc)
            raise

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        BREAKER.before_call()
        try:
            await super().send_packed_command(command, check_health)  # type: ignore[misc]
        except CircuitOpen:
            raise
        except _COUNTED as exc:
            if self.counts_failures:
                BREAKER.failed(exc)
            raise

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            response = await super().read_response(*args, **kwargs)  # type: ignore[misc]
        except _COUNTED as exc:
            if self.counts_failures:
                BREAKER.failed(exc)
            raise
        except ResponseError as exc:
            if is_auth_error(exc):
                BREAKER.failed(exc)
            else:
                BREAKER.succeeded()
            raise
        BREAKER.succeeded()
        return response


class GuardedConnection(_Guarded, Connection):
    pass


class GuardedUnixConnection(_Guarded, UnixDomainSocketConnection):
    pass


class GuardedSSLConnection(_Guarded, SSLConnection):
    pass


class GuardedClusterConnection(_Guarded, Connection):
    """A cluster node's connection: the cluster client counts failed calls."""

    counts_failures = False


class GuardedClusterSSLConnection(_Guarded, SSLConnection):
    """A cluster node's TLS connection: the cluster client counts failed calls."""

    counts_failures = False
