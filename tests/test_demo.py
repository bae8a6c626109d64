"""``agentq demo``: on the embedded Redis with nothing configured, it runs a small
graph end to end and exits 0 within 30 seconds, showing the results and the audit
history of one job."""

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


def test_demo_runs_end_to_end_on_the_embedded_redis() -> None:
    # A short path: the embedded server's unix socket lives in it.
    home = Path(tempfile.mkdtemp(prefix="aqd", dir="/tmp"))
    env = _bare_env(home)
    try:
        started = time.monotonic()
        result = subprocess.run([*PYTHON, "demo"], capture_output=True, text=True, env=env,
                                cwd=home, timeout=60, check=False)
        elapsed = time.monotonic() - started
        output = result.stdout
        assert result.returncode == 0, (result.returncode, output, result.stderr)
        assert elapsed < 30, elapsed

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
