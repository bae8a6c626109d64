"""A subprocess whose standard output lines a test watches (the crash tests'
gate and projector processes print READY, then a line per event handled)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

import pytest


class LineProcess:
    """A subprocess; its stdout lines are collected as they come."""

    name = "process"  # in failure messages
    poll_seconds = 0.01

    def __init__(self, proc: asyncio.subprocess.Process, stderr_path: Path) -> None:
        self.proc = proc
        self.stderr_path = stderr_path
        self.lines: list[str] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout
        async for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def count(self, prefix: str) -> int:
        return sum(1 for line in self.lines if line.startswith(prefix))

    async def wait_for(self, check: Callable[[], bool], what: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline or self.proc.returncode is not None:
                pytest.fail(f"{self.name}: no {what}; stdout tail={self.lines[-5:]!r} "
                            f"rc={self.proc.returncode} stderr={self.stderr()[-2000:]}")
            await asyncio.sleep(self.poll_seconds)

    async def ready(self) -> str:
        """Wait for READY; returns what follows it (the consumer name)."""
        await self.wait_for(lambda: any(x.startswith("READY ") for x in self.lines), "READY")
        return next(x for x in self.lines if x.startswith("READY ")).split(" ", 1)[1]

    async def kill(self) -> None:
        self.proc.kill()
        assert await asyncio.wait_for(self.proc.wait(), 5) == -signal.SIGKILL
        await asyncio.gather(self._reader, return_exceptions=True)

    async def close(self) -> None:
        """Make sure the process is gone and reaped (SIGTERM, then SIGKILL)."""
        if self.proc.returncode is None:
            with suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout=5)
            except TimeoutError:
                with suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        await asyncio.gather(self._reader, return_exceptions=True)
