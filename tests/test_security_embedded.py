"""The embedded server's files are the user's alone (issue 11 item 4): its data
directory is 0700 even when it existed before with looser modes, the files
Redis writes there are readable by nobody else, and a socket that does not fit
in the home lives in a directory only the user can enter, never at a name in
the shared temporary directory that another local user could take first."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from agentq import embedded
from agentq.embedded import EmbeddedServerError, ensure_server, server_status, stop_server

NOBODY = 65534


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def scratch(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A short temporary directory of the test's own, standing for the system's
    shared one (the socket's fallback place), so that nothing is done to the
    machine's real ``/tmp``."""
    base = Path(tempfile.mkdtemp(prefix="aq-"))
    os.chmod(base, 0o1777)  # shared like /tmp
    monkeypatch.setattr(tempfile, "tempdir", str(base))
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def long_home(tmp_path: Path) -> Iterator[Path]:
    home = tmp_path.joinpath(*(["a-rather-long-directory-name"] * 4))
    yield home
    stop_server(home)


def test_an_existing_data_directory_is_made_private(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    os.chmod(home, 0o755)
    try:
        server = ensure_server(home)
        client = redis.Redis.from_url(server.url, driver_info=None)
        try:
            client.set("k", "v")
            client.bgrewriteaof()
            client.save()
        finally:
            client.close()
        assert _mode(home) == 0o700
        written = [p for p in home.rglob("*") if p.is_file()]
        assert any(p.name.startswith("appendonly") for p in written), written
        # What Redis writes (AOF, RDB, log) has no group or other bits.
        loose = {p.name: oct(_mode(p)) for p in written if _mode(p) & 0o077}
        assert loose == {}
    finally:
        stop_server(home)


def test_a_socket_outside_the_home_is_in_a_private_directory(
    scratch: Path, long_home: Path
) -> None:
    server = ensure_server(long_home)
    folder = server.socket.parent
    assert folder != long_home.resolve() and folder.parent == scratch
    info = os.lstat(folder)
    assert stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()
    assert _mode(folder) == 0o700
    assert server_status(long_home) == server
    stop_server(long_home)
    assert not server.socket.exists()


def test_a_loose_socket_directory_of_ones_own_is_tightened(
    scratch: Path, long_home: Path
) -> None:
    folder = embedded._socket_path(long_home.resolve()).parent
    folder.mkdir(mode=0o777)
    os.chmod(folder, 0o777)
    server = ensure_server(long_home)
    assert server.socket.parent == folder and _mode(folder) == 0o700


@pytest.mark.skipif(os.getuid() != 0, reason="making a directory another user owns needs root")
def test_a_socket_directory_another_user_took_is_refused(
    scratch: Path, long_home: Path
) -> None:
    folder = embedded._socket_path(long_home.resolve()).parent
    folder.mkdir(mode=0o777)
    os.chown(folder, NOBODY, NOBODY)
    with pytest.raises(EmbeddedServerError, match=str(folder)):
        ensure_server(long_home)
    assert server_status(long_home) is None
    assert list(folder.iterdir()) == []  # no socket was made there


def test_a_symlink_in_place_of_the_socket_directory_is_refused(
    scratch: Path, long_home: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    folder = embedded._socket_path(long_home.resolve()).parent
    folder.symlink_to(elsewhere)
    with pytest.raises(EmbeddedServerError, match=str(folder)):
        ensure_server(long_home)
    assert list(elsewhere.iterdir()) == []
