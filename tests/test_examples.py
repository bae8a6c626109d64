"""The README's Quick start and its Python script, run as the README gives them
(issue 12 items 10, 11, 13): the commands are read from the README's code
blocks, so README and test cannot drift.

Each block runs in a folder of its own that holds, like the repository's top
folder, ``.venv`` and ``examples`` (links to the real ones), on the embedded
Redis that the first command starts there. A line marked ``# in another
terminal`` runs in the background until the block ends, when it gets Ctrl-C
(SIGINT); ``j_…`` is the id the block's last ``dispatch`` printed; ``export``
lines hold for the rest of the block.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from _redis_server import free_port

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
BACKGROUND = "# in another terminal"
JOB_PLACEHOLDER = "j_…"

pytestmark = pytest.mark.timeout(180)


def _section(title: str) -> str:
    """The README's text under ``## title``, up to the next ``## `` heading."""
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end != -1 else None]


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", text, re.M | re.S)


def _strip_comment(line: str) -> str:
    """The command without its trailing ``# comment`` (none of them quote a #)."""
    return re.sub(r"\s+#\s.*$", "", line).strip()


def _ctrl_c_as_in_a_terminal() -> None:
    """A process started in the background by a non-interactive shell (as CI may
    start this suite) inherits SIGINT ignored; a user's terminal does not."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@dataclass
class Folder:
    """A folder laid out like the repository's top one, and a user's environment."""

    root: Path
    env: dict[str, str]
    background: list[tuple[str, subprocess.Popen[bytes], Path]] = field(default_factory=list)

    @property
    def cwd(self) -> Path:
        return self.root / "repo"

    def shell(self, script: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "-c", script], cwd=self.cwd, env=self.env,
                              capture_output=True, text=True, timeout=timeout, check=False)

    def start(self, script: str) -> None:
        """Run ``script`` in the background; return once it has said something (a
        worker announces itself, the HTTP server prints where it listens)."""
        out = self.root / f"background-{len(self.background)}.log"
        with open(out, "wb") as sink:
            proc = subprocess.Popen(["bash", "-c", script], cwd=self.cwd, env=self.env,
                                    stdout=sink, stderr=subprocess.STDOUT,
                                    start_new_session=True, preexec_fn=_ctrl_c_as_in_a_terminal)
        self.background.append((script, proc, out))
        deadline = time.monotonic() + 30
        while not out.read_bytes().strip():
            assert proc.poll() is None, f"{script!r} exited: {out.read_text()}"
            assert time.monotonic() < deadline, f"{script!r} said nothing in 30 s"
            time.sleep(0.02)

    def interrupt_background(self) -> list[tuple[str, int, str]]:
        """Ctrl-C to each background process; (script, exit code, output) of each."""
        ended = []
        for script, proc, out in self.background:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGINT)
            try:
                code = proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                code = proc.wait(timeout=5)
            ended.append((script, code, out.read_text(errors="replace")))
        self.background.clear()
        return ended


@pytest.fixture
def folder() -> Iterator[Folder]:
    # A short path: the embedded server's unix socket lives in it.
    root = Path(tempfile.mkdtemp(prefix="aqex", dir="/tmp"))
    (root / "repo").mkdir()
    (root / "home").mkdir()
    (root / "repo" / ".venv").symlink_to(Path(sys.prefix))
    (root / "repo" / "examples").symlink_to(REPO / "examples")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AGENTQ_", "VIRTUAL_ENV", "PYTHON")) and "REDIS" not in k}
    env["HOME"] = str(root / "home")
    made = Folder(root, env)
    try:
        yield made
    finally:
        made.interrupt_background()
        agentq = str(Path(sys.prefix) / "bin" / "agentq")
        # Every home a block may have left a server running in, stopped by its pid file.
        for home in (made.cwd / ".agentq", *sorted((root / "home").glob("*"))):
            if (home / "redis.pid").exists():
                subprocess.run([agentq, "server", "stop"], cwd=made.cwd, timeout=60,
                               env={**env, "AGENTQ_HOME": str(home)}, capture_output=True,
                               check=False)
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class Ran:
    line: str
    result: subprocess.CompletedProcess[str]


def _run_block(folder: Folder, block: str, preamble: str, port: int) -> list[Ran]:
    """Run a README block line by line; the outputs of the lines run in the foreground."""
    exports: list[str] = []
    job_id: str | None = None
    ran: list[Ran] = []
    for raw in block.splitlines():
        line = _strip_comment(raw)
        if not line or line == preamble:
            continue
        if line.startswith("export "):
            exports.append(line)
            continue
        line = line.replace("8080", str(port))
        if JOB_PLACEHOLDER in line:
            assert job_id is not None, f"{raw!r}: no job dispatched before it"
            line = line.replace(JOB_PLACEHOLDER, job_id)
        setup = "; ".join([preamble, *exports])
        if BACKGROUND in raw:
            # `exec env` so that the Ctrl-C goes to the command itself, not to bash.
            folder.start(f"{setup}; exec env {line}")
            continue
        result = folder.shell(f"{setup}; {line}")
        ran.append(Ran(line, result))
        assert result.returncode == 0, (line, result.stdout, result.stderr)
        dispatched = re.search(r"^Job (j_\S+) dispatched", result.stdout, re.M)
        if dispatched:
            job_id = dispatched.group(1)
    for script, code, output in folder.interrupt_background():
        # Ctrl-C stops a worker (and the HTTP server) cleanly.
        assert code == 0, (script, code, output)
        assert "Traceback" not in output, (script, output)
    return ran


def _output(ran: list[Ran], command: str) -> str:
    return "\n".join(r.result.stdout for r in ran if r.line.startswith(command))


def test_the_quick_start_runs_as_written(folder: Folder) -> None:
    blocks = _blocks(_section("Quick start"), "sh")
    assert len(blocks) == 5, blocks
    preamble = blocks[0].splitlines()[0]
    assert preamble == ". .venv/bin/activate"
    exec_block, http_block, python_block, server_block, move_block = blocks
    for block in (exec_block, http_block, python_block):
        assert BACKGROUND in block and JOB_PLACEHOLDER in block
    port = free_port()

    # --exec: the script reports progress and prints its result.
    ran = _run_block(folder, exec_block, preamble, port)
    assert "completed" in _output(ran, "agentq wait")
    assert "Summary of j_" in _output(ran, "agentq wait")
    history = _output(ran, "agentq history")
    for event in ("JobDispatched", "JobStarted", "JobProgress", "JobCompleted"):
        assert event in history, (event, history)
    researcher_job = re.search(r"Job (j_\S+) dispatched", _output(ran, "agentq dispatch"))

    # --http: a tiny server of the standard library answers the POST.
    ran = _run_block(folder, http_block, preamble, port)
    waited = _output(ran, "agentq wait")
    assert "completed" in waited and "A note on a short note" in waited, waited

    # --handler: a Python function, found through PYTHONPATH.
    ran = _run_block(folder, python_block, preamble, port)
    waited = _output(ran, "agentq wait")
    assert "completed" in waited and "fold the events" in waited, waited

    # The embedded server: status, stop (its data is kept)...
    ran = _run_block(folder, server_block, preamble, port)
    assert "Stopped the embedded Redis server" in _output(ran, "agentq server stop")
    assert (folder.cwd / ".agentq" / "appendonly.aof").exists()
    # ...and moved with AGENTQ_HOME: the next command finds the same jobs there.
    ran = _run_block(folder, move_block, preamble, port)
    assert not (folder.cwd / ".agentq").exists()
    moved = next((folder.root / "home").iterdir())
    assert (moved / "redis.pid").exists()
    assert researcher_job is not None
    assert researcher_job.group(1) in _output(ran, "agentq list")


def test_the_python_script_runs_as_written(folder: Folder) -> None:
    section = _section("From Python")
    (script,) = _blocks(section, "python")
    path = REPO / "examples" / "api.py"
    # The README shows the script itself, all of it but its docstring.
    assert path.read_text().endswith(script)
    command = re.search(r"run as `(python examples/\S+)`", section)
    assert command is not None and command.group(1) == "python examples/api.py"
    started = time.monotonic()
    result = folder.shell(f". .venv/bin/activate; {command.group(1)}")
    assert result.returncode == 0, (result.stdout, result.stderr)
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"dispatched j_\S+\.researcher queued", lines[0]), lines
    assert lines[1] == "completed {'summary': 'notes on the event log'}", lines
    assert [line.strip() for line in lines[2:]] == [
        "JobDispatched", "JobStarted", "JobProgress", "JobCompleted"]
    # The worker stopped once the job ended: the script returned promptly.
    assert time.monotonic() - started < 30
