"""``agentq demo``: on the embedded Redis with nothing configured, it runs a small
graph end to end and exits 0 within 30 seconds, showing the results and the audit
history of one job; and again, as often as one likes, on the same data directory."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PYTHON = [sys.executable, "-m", "agentq.cli"]


def _bare_env(home: Path) -> dict[str, str]:
    """No AGENTQ_ settings and no Redis URL: only a data directory of its own."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AGENTQ_") and "REDIS" not in k}
    env["AGENTQ_HOME"] = str(home)
    return env


def _demo(env: dict[str, str], home: Path) -> subprocess.CompletedProcess[str]:
    started = time.monotonic()
    result = subprocess.run([*PYTHON, "demo"], capture_output=True, text=True, env=env,
                            cwd=home, timeout=60, check=False)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert elapsed < 30, elapsed
    return result


def test_demo_runs_end_to_end_on_the_embedded_redis_again_and_again() -> None:
    # A short path: the embedded server's unix socket lives in it.
    home = Path(tempfile.mkdtemp(prefix="aqd", dir="/tmp"))
    env = _bare_env(home)
    try:
        first = _demo(env, home)
        # The first run starts the server and says so, with its data directory.
        assert f"started an embedded Redis server with its data in {home.resolve()}" in (
            first.stderr)
        # Four runs in a row within a minute: more dispatches than the default rate limit
        # (10 a minute per caller) allows; the demo's own jobs are not limited.
        for _ in range(3):
            result = _demo(env, home)
        assert "started an embedded" not in result.stderr
        output = result.stdout

        # It ran on the embedded server in AGENTQ_HOME.
        assert "Redis at unix://" in output
        assert str(home.resolve()) in output or str(home) in output
        # Progress as it ran: events of all three agents.
        for agent in ("planner", "researcher", "writer"):
            assert re.search(rf"^\s+\+\s*\d+\.\d\ds\s+{agent}\s", output, re.M), agent
        assert "JobProgress" in output
        assert "DependencyResolved" in output

        # The results: both researchers and the writer completed, the writer with a
        # summary built from the researchers' notes.
        results = output.split("\nresults:\n", 1)[1].split("\n\n", 1)[0].splitlines()
        assert [line.split()[:2] for line in results] == [
            ["researcher", "completed"], ["researcher", "completed"], ["writer", "completed"]]
        writer = results[2]
        assert "Summary: notes on how the log is kept" in writer
        assert "notes on how the views are derived" in writer

        # The audit history of the writing job, oldest first.
        audit = re.search(r"audit history of the writing job (j_\S+):\n((?:  .*\n)+)", output)
        assert audit, output
        writing_id = audit.group(1)
        types = [line.split()[1] for line in audit.group(2).splitlines()]
        # Released by its two dependencies' completions, then run once.
        assert types == ["JobDispatched", "DependencyResolved", "DependencyResolved",
                         "JobQueued", "JobStarted", "JobCompleted"], types
        assert f"agentq status {writing_id}" in output
        # It says that the server keeps running, and how to stop it.
        assert re.search(r"embedded Redis server keeps running.*\n?.*agentq server stop",
                         output.rsplit("done in", 1)[1]), output

        # The data stays: the writing job can be looked up afterwards.
        status = subprocess.run([*PYTHON, "status", writing_id, "--json"], capture_output=True,
                                text=True, env=env, cwd=home, timeout=60, check=False)
        assert status.returncode == 0, status.stderr
        assert '"state": "completed"' in status.stdout
    finally:
        stopped = subprocess.run([*PYTHON, "server", "stop"], capture_output=True, text=True,
                                 env=env, cwd=home, timeout=60, check=False)
        shutil.rmtree(home, ignore_errors=True)
        assert stopped.returncode == 0, stopped.stderr
