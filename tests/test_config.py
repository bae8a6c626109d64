"""The config (SPEC "Config"): one TOML, YAML or JSON file, unknown keys rejected,
errors naming the path of each bad field, ``AGENTQ_…`` environment overrides,
precedence flags > environment > file > defaults, ``agentq config validate`` and
``agentq config schema``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from _redis_server import free_port

from agentq.config import load_config
from agentq.schemas.config import Config, ExecHandler
from agentq.schemas.errors import InvalidInput

REPO = Path(__file__).resolve().parent.parent
FORMATS = ("toml", "yaml", "json")


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTQ_")}
    env.update(extra)
    return env


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentq.cli", *args],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )


# The same content in each format: a valid config, and one with a bad type, an
# out-of-range value, an unknown key at the top and unknown keys further down.
VALID = {
    "toml": """
keyPrefix = "demo"
[redis]
host = "10.0.0.5"
port = 6380
[rateLimit]
dispatchesPerMinute = 0
[agents.researcher]
allowAgents = ["writer"]
maxAttempts = 5
handler = { exec = "python research.py" }
[[dlq.sinks]]
type = "log"
[[dlq.sinks]]
type = "stream"
key = "alerts"
""",
    "yaml": """
keyPrefix: demo
redis: {host: 10.0.0.5, port: 6380}
rateLimit: {dispatchesPerMinute: 0}
agents:
  researcher:
    allowAgents: [writer]
    maxAttempts: 5
    handler: {exec: python research.py}
dlq:
  sinks: [{type: log}, {type: stream, key: alerts}]
""",
    "json": json.dumps({
        "keyPrefix": "demo",
        "redis": {"host": "10.0.0.5", "port": 6380},
        "rateLimit": {"dispatchesPerMinute": 0},
        "agents": {"researcher": {"allowAgents": ["writer"], "maxAttempts": 5,
                                  "handler": {"exec": "python research.py"}}},
        "dlq": {"sinks": [{"type": "log"}, {"type": "stream", "key": "alerts"}]},
    }),
}

BAD = {
    "toml": """
bogus = 1
[rateLimit]
dispatchesPerMinute = "lots"
bogus = 2
[jobs]
maxAttempts = 50
[redis.tls]
enabled = true
colour = "red"
""",
    "yaml": """
bogus: 1
rateLimit: {dispatchesPerMinute: lots, bogus: 2}
jobs: {maxAttempts: 50}
redis: {tls: {enabled: true, colour: red}}
""",
    "json": json.dumps({
        "bogus": 1,
        "rateLimit": {"dispatchesPerMinute": "lots", "bogus": 2},
        "jobs": {"maxAttempts": 50},
        "redis": {"tls": {"enabled": True, "colour": "red"}},
    }),
}
BAD_PATHS = ("bogus", "rateLimit.dispatchesPerMinute", "rateLimit.bogus", "jobs.maxAttempts",
             "redis.tls.colour")


def _write(tmp_path: Path, fmt: str, text: str, name: str = "agentq") -> Path:
    path = tmp_path / f"{name}.{fmt}"
    path.write_text(text)
    return path


# -- defaults -----------------------------------------------------------------------


def test_defaults_are_specs() -> None:
    config = load_config(None, environ={})
    assert config.wire() == {
        "redis": {"url": None, "host": "127.0.0.1", "port": 6379, "username": None,
                  "password": None, "db": 0,
                  "tls": {"enabled": False, "verify": True, "caFile": None,
                          "certFile": None, "keyFile": None},
                  "cluster": False, "waitReplicas": 0, "waitTimeoutMs": 1000},
        "keyPrefix": "aq",
        "circuitBreaker": {"failureThreshold": 5, "resetTimeoutSeconds": 30},
        "rateLimit": {"dispatchesPerMinute": 10, "maxQueueDepth": 50},
        "limits": {"maxDepth": 3},
        "jobs": {"maxAttempts": 3, "backoffBaseSeconds": 5, "backoffMaxSeconds": 300,
                 "leaseSeconds": 60, "timeoutSeconds": 0,
                 "idempotencyTtlSeconds": config.jobs.idempotency_ttl_seconds},
        "workers": {"heartbeatTimeoutSeconds": 30, "shutdownGraceSeconds": 30},
        "dlq": {"sinks": [{"type": "log"}]},
        "auth": {"systemAgents": ["main"], "approvers": None},
        "approvals": {"sinks": [{"type": "log"}]},
        "agents": {},
        "retention": {"jobsSeconds": 604800, "idempotencySeconds": 86400, "archive": None},
    }


# -- files ----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_valid_file_in_each_format(tmp_path: Path, fmt: str) -> None:
    config = load_config(_write(tmp_path, fmt, VALID[fmt]), environ={})
    assert config.key_prefix == "demo"
    assert (config.redis.host, config.redis.port) == ("10.0.0.5", 6380)
    assert config.rate_limit.dispatches_per_minute == 0
    assert config.rate_limit.max_queue_depth == 50  # untouched fields keep their defaults
    researcher = config.agents["researcher"]
    assert researcher.allow_agents == ["writer"]
    assert researcher.max_attempts == 5
    assert researcher.handler == ExecHandler(exec="python research.py")
    assert [s.type for s in config.dlq.sinks] == ["log", "stream"]


def test_the_three_formats_mean_the_same(tmp_path: Path) -> None:
    loaded = [load_config(_write(tmp_path, fmt, VALID[fmt]), environ={}) for fmt in FORMATS]
    assert loaded[0] == loaded[1] == loaded[2]


@pytest.mark.parametrize("fmt", FORMATS)
def test_errors_name_the_path_of_each_bad_field(tmp_path: Path, fmt: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        load_config(_write(tmp_path, fmt, BAD[fmt]), environ={})
    error = caught.value
    assert error.code == "invalid_input"
    for path in BAD_PATHS:
        assert path in error.message, path
    assert error.path in BAD_PATHS
    assert f"agentq.{fmt}" in error.message  # which file


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"rateLimit": {"bogus": 1}}, "rateLimit.bogus"),
        ({"agents": {"researcher": {"colour": "red"}}}, "agents.researcher.colour"),
        ({"agents": {"researcher": {"handler": {"exec": "x", "shell": "sh"}}}},
         "agents.researcher.handler"),
        ({"dlq": {"sinks": [{"type": "webhook"}]}}, "dlq.sinks.0"),
        ({"circuitBreaker": {"failureThreshold": 0}}, "circuitBreaker.failureThreshold"),
        ({"redis": {"port": 70000}}, "redis.port"),
        ({"keyPrefix": "no spaces"}, "keyPrefix"),
        ({"auth": {"systemAgents": []}}, "auth.systemAgents"),
        ({"jobs": {"leaseSeconds": "long"}}, "jobs.leaseSeconds"),
    ],
)
def test_nested_errors_name_their_path(tmp_path: Path, data: dict[str, Any], path: str) -> None:
    file = _write(tmp_path, "json", json.dumps(data))
    with pytest.raises(InvalidInput) as caught:
        load_config(file, environ={})
    assert path in caught.value.message
    assert str(caught.value.path).startswith(path)


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput) as missing:
        load_config(tmp_path / "nope.toml", environ={})
    assert "nope.toml" in missing.value.message
    broken = _write(tmp_path, "toml", "rateLimit = {")
    with pytest.raises(InvalidInput) as malformed:
        load_config(broken, environ={})
    assert "agentq.toml" in malformed.value.message
    listed = _write(tmp_path, "yaml", "- a\n- b\n")
    with pytest.raises(InvalidInput):
        load_config(listed, environ={})


# -- the environment --------------------------------------------------------------------


def test_environment_overrides() -> None:
    config = load_config(None, environ={
        "AGENTQ_RATE_LIMIT__DISPATCHES_PER_MINUTE": "0",
        "AGENTQ_AGENTS__RESEARCHER__MAX_ATTEMPTS": "4",
        "AGENTQ_REDIS__TLS__ENABLED": "true",
        "AGENTQ_REDIS__TLS__CA_FILE": "/etc/ca.pem",
        "AGENTQ_AUTH__SYSTEM_AGENTS": '["ops", "main"]',
        "AGENTQ_CIRCUIT_BREAKER__RESET_TIMEOUT_SECONDS": "2.5",
        "AGENTQ_REDIS_URL": "redis://10.0.0.9:6379/2",
    })
    assert config.rate_limit.dispatches_per_minute == 0
    assert config.rate_limit.max_queue_depth == 50
    assert config.agents["researcher"].max_attempts == 4
    assert config.redis.tls.enabled is True
    assert config.redis.tls.ca_file == "/etc/ca.pem"
    assert config.auth.system_agents == ["ops", "main"]
    assert config.operator == "ops"
    assert config.circuit_breaker.reset_timeout_seconds == 2.5
    assert config.redis.url == "redis://10.0.0.9:6379/2"


def test_environment_names_that_are_no_config_path_are_left_alone() -> None:
    environ = {
        "AGENTQ_HOME": "/tmp/somewhere",
        "AGENTQ_JOB_ID": "j_01ARZ3NDEKTSV4RRFFQ69G5FAV.a",
        "AGENTQ_AGENT": "planner",
        "AGENTQ_TARGET": "a",
        "AGENTQ_ATTEMPT": "2",
        "AGENTQ_JOB_JSON": '{"jobId": "j_x"}',
        "AGENTQ_DISPATCHED_BY": "main",
        "AGENTQ_RATE_LIMIT__BOGUS": "1",
        "NOT_AGENTQ_KEY_PREFIX": "zz",
    }
    assert load_config(None, environ=environ) == load_config(None, environ={})


def test_environment_errors_name_the_path() -> None:
    with pytest.raises(InvalidInput) as caught:
        load_config(None, environ={"AGENTQ_JOBS__MAX_ATTEMPTS": "99"})
    assert "jobs.maxAttempts" in caught.value.message
    with pytest.raises(InvalidInput) as typed:
        load_config(None, environ={"AGENTQ_AGENTS__RESEARCHER__CONCURRENCY": "many"})
    assert "agents.researcher.concurrency" in typed.value.message


def test_environment_strings_that_look_like_json_stay_strings() -> None:
    # A password or a key prefix made of digits is still a string.
    config = load_config(None, environ={"AGENTQ_REDIS__PASSWORD": "123456",
                                        "AGENTQ_KEY_PREFIX": "2024"})
    assert config.redis.password == "123456"
    assert config.key_prefix == "2024"


def test_environment_sets_a_handler_field() -> None:
    # Every field has an environment name, a handler's fields included.
    config = load_config(None, environ={
        "AGENTQ_AGENTS__RESEARCHER__HANDLER__EXEC": "python research.py",
    })
    assert config.agents["researcher"].handler == ExecHandler(exec="python research.py")


def test_environment_sets_a_whole_object_as_json() -> None:
    config = load_config(None, environ={
        "AGENTQ_AGENTS__WRITER__HANDLER": '{"http": "http://127.0.0.1:9/jobs"}',
        "AGENTQ_DLQ__SINKS": '[{"type": "stream", "key": "dead"}]',
    })
    handler = config.agents["writer"].handler
    assert handler is not None and handler.wire() == {"http": "http://127.0.0.1:9/jobs"}
    assert [s.wire() for s in config.dlq.sinks] == [{"type": "stream", "key": "dead"}]


# -- precedence ----------------------------------------------------------------------------


def test_precedence_flags_then_environment_then_file_then_defaults(tmp_path: Path) -> None:
    file = _write(tmp_path, "yaml", """
redis: {url: "redis://file:1/0"}
rateLimit: {dispatchesPerMinute: 1, maxQueueDepth: 7}
jobs: {maxAttempts: 2}
""")
    environ = {
        "AGENTQ_REDIS_URL": "redis://env:2/0",
        "AGENTQ_RATE_LIMIT__DISPATCHES_PER_MINUTE": "0",
    }
    flags = {"redis": {"url": "redis://flag:3/0"}}

    config = load_config(file, environ=environ, flags=flags)
    assert config.redis.url == "redis://flag:3/0"  # flag over environment over file
    assert config.rate_limit.dispatches_per_minute == 0  # environment over file
    assert config.rate_limit.max_queue_depth == 7  # file over default, not dropped by env
    assert config.jobs.max_attempts == 2  # file over default
    assert config.limits.max_depth == 3  # default

    assert load_config(file, environ=environ).redis.url == "redis://env:2/0"
    assert load_config(file, environ={}).redis.url == "redis://file:1/0"
    assert load_config(None, environ={}).redis.url is None


def test_config_file_from_agentq_config(tmp_path: Path) -> None:
    file = _write(tmp_path, "toml", VALID["toml"])
    assert load_config(None, environ={"AGENTQ_CONFIG": str(file)}).key_prefix == "demo"
    other = _write(tmp_path, "json", json.dumps({"keyPrefix": "other"}), name="other")
    # An explicit path (--config) wins over AGENTQ_CONFIG.
    assert load_config(other, environ={"AGENTQ_CONFIG": str(file)}).key_prefix == "other"


def test_cli_precedence_redis_flag_over_environment_over_file(
    tmp_path: Path, redis_url: str, make_config: Callable[..., Config]
) -> None:
    file_port, env_port = free_port(), free_port()
    file = _write(tmp_path, "json", json.dumps({
        "redis": {"url": f"redis://127.0.0.1:{file_port}/0"},
    }))
    env = _clean_env(AGENTQ_KEY_PREFIX=make_config().key_prefix,
                     AGENTQ_REDIS_URL=f"redis://127.0.0.1:{env_port}/0")
    flagged = _cli("agents", "list", "--config", str(file), "--redis", redis_url, "--json",
                   env=env)
    assert flagged.returncode == 0, flagged.stderr
    assert json.loads(flagged.stdout) == {"agents": {}}

    from_env = _cli("agents", "list", "--config", str(file), "--json", env=env)
    assert from_env.returncode == 6
    message = json.loads(from_env.stdout)["error"]["message"]
    assert f":{env_port}" in message
    assert f":{file_port}" not in message


# -- agentq config validate / schema --------------------------------------------------------


def test_config_validate_exit_codes(tmp_path: Path) -> None:
    env = _clean_env()
    good = _write(tmp_path, "toml", VALID["toml"])
    bad = _write(tmp_path, "yaml", BAD["yaml"])
    runs = {
        "ok": (["config", "validate", str(good)], {}),
        # --json: the effective config, environment applied.
        "json": (["config", "validate", str(good), "--json"],
                 {"AGENTQ_RATE_LIMIT__MAX_QUEUE_DEPTH": "9"}),
        "bad": (["config", "validate", str(bad), "--json"], {}),
        "from env": (["config", "validate"], {"AGENTQ_CONFIG": str(good)}),
        "env breaks it": (["config", "validate", str(good), "--json"],
                          {"AGENTQ_JOBS__MAX_ATTEMPTS": "0"}),
        "missing": (["config", "validate", str(tmp_path / "absent.toml"), "--json"], {}),
        "nothing": (["config", "validate", "--json"], {}),
    }
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(_cli, *args, env={**env, **extra})
                   for name, (args, extra) in runs.items()}
        results = {name: future.result() for name, future in futures.items()}

    ok = results["ok"]
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == f"{good}: valid"

    as_json = results["json"]
    assert as_json.returncode == 0, as_json.stderr
    body = json.loads(as_json.stdout)
    assert (body["ok"], body["file"]) == (True, str(good))
    assert body["config"]["keyPrefix"] == "demo"
    assert body["config"]["rateLimit"] == {"dispatchesPerMinute": 0, "maxQueueDepth": 9}

    refused = results["bad"]
    assert refused.returncode == 2
    error = json.loads(refused.stdout)["error"]
    assert error["code"] == "invalid_input"
    for path in BAD_PATHS:
        assert path in error["message"], path
        assert path in refused.stderr

    assert results["from env"].returncode == 0, results["from env"].stderr

    env_breaks_it = results["env breaks it"]
    assert env_breaks_it.returncode == 2
    assert "jobs.maxAttempts" in json.loads(env_breaks_it.stdout)["error"]["message"]

    missing = results["missing"]
    assert missing.returncode == 2
    assert "absent.toml" in json.loads(missing.stdout)["error"]["message"]

    nothing = results["nothing"]
    assert nothing.returncode == 2
    assert json.loads(nothing.stdout)["error"]["code"] == "invalid_input"


def test_committed_schema_is_the_cli_schema() -> None:
    printed = _cli("config", "schema", env=_clean_env())
    assert printed.returncode == 0, printed.stderr
    schema = json.loads(printed.stdout)
    committed = json.loads((REPO / "schemas" / "json" / "config.json").read_text())
    assert schema == committed
    assert schema == Config.model_json_schema(by_alias=True)
    assert schema["additionalProperties"] is False
    assert {"redis", "keyPrefix", "circuitBreaker", "rateLimit", "limits", "jobs", "workers",
            "dlq", "auth", "agents", "retention"} <= set(schema["properties"])
