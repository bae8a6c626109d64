"""``agentq tokens add|list|revoke`` as subprocesses on a real Redis, and the store
under them (``eventlog/tokens.py``): a token is shown once, only its SHA-256 is
kept, and only system agents manage tokens."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable

import pytest
from test_cli import Cli, cli_on_a_fresh_prefix

import agentq
from agentq.schemas.config import Config


@pytest.fixture
def cli(redis_url: str, make_config: Callable[..., Config]) -> Cli:
    return cli_on_a_fresh_prefix(redis_url, make_config)


def _verify(cli: Cli, token: str) -> str | None:
    async def run() -> str | None:
        config = Config.model_validate({"keyPrefix": cli.env["AGENTQ_KEY_PREFIX"]})
        async with agentq.connect(cli.redis_url, config) as q:
            return await q.tokens.verify(token)

    return asyncio.run(run())


def _stored(cli: Cli) -> dict[str, str]:
    async def run() -> dict[str, str]:
        config = Config.model_validate({"keyPrefix": cli.env["AGENTQ_KEY_PREFIX"]})
        async with agentq.connect(cli.redis_url, config) as q:
            stored: dict[str, str] = await q.redis.hgetall(q.keys.tokens)  # type: ignore[misc]
            return stored

    return asyncio.run(run())


def test_add_list_revoke_by_prefix_and_by_agent(cli: Cli) -> None:
    first = cli.json("tokens", "add", "planner")
    assert set(first) == {"token", "agent", "prefix", "createdAt"}
    token = first["token"]
    assert token.startswith("aqt.") and len(token) >= 40
    assert first["prefix"] == token[:12] and first["agent"] == "planner"
    second = cli.json("tokens", "add", "planner")["token"]
    other = cli.ok("tokens", "add", "writer").stdout.strip()  # without --json: the token alone
    assert other.startswith("aqt.") and len({token, second, other}) == 3

    # Only the digests are kept; each names its agent.
    stored = _stored(cli)
    assert set(stored) == {hashlib.sha256(t.encode()).hexdigest() for t in (token, second, other)}
    assert not any(t in json.dumps(stored) for t in (token, second, other))
    assert [_verify(cli, t) for t in (token, second, other)] == ["planner", "planner", "writer"]
    assert _verify(cli, token + "x") is None and _verify(cli, "nonsense") is None

    listed = cli.json("tokens", "list")["tokens"]
    assert [(e["agent"], e["prefix"]) for e in listed] == [
        ("planner", token[:12]), ("planner", second[:12]), ("writer", other[:12])]
    human = cli.ok("tokens", "list").stdout
    assert "planner" in human and token[:12] in human and token not in human

    revoked = cli.json("tokens", "revoke", token[:12])["revoked"]
    assert [e["prefix"] for e in revoked] == [token[:12]]
    assert _verify(cli, token) is None and _verify(cli, second) == "planner"

    by_agent = cli.ok("tokens", "revoke", "planner").stdout
    assert f"Revoked token {second[:12]} of agent planner" in by_agent
    assert _verify(cli, second) is None and _verify(cli, other) == "writer"

    nothing = cli("tokens", "revoke", "planner", "--json")
    assert nothing.returncode == 3
    assert json.loads(nothing.stdout)["error"]["code"] == "not_found"
    assert "tokens list" in nothing.stderr


def test_only_system_agents_manage_tokens(cli: Cli) -> None:
    token = cli.ok("tokens", "add", "planner").stdout.strip()
    for command in (["add", "planner"], ["list"], ["revoke", "planner"]):
        refused = cli("tokens", *command, "--as", "planner", "--json")
        assert refused.returncode == 4, refused.stderr
        assert json.loads(refused.stdout) == {"error": {
            "code": "unauthorized",
            "message": f"Unauthorized: tokens {command[0]} requires a system agent."}}
    # Nothing was made or revoked by the refused commands; a system agent named
    # with --as may manage tokens, as the operator (no --as) does.
    assert [e["prefix"] for e in cli.json("tokens", "list", "--as", "main")["tokens"]] == [
        token[:12]]


def test_a_bad_agent_id_is_a_usage_error(cli: Cli) -> None:
    bad = cli("tokens", "add", "Planner", "--json")
    assert bad.returncode == 2
    assert json.loads(bad.stdout)["error"]["code"] == "invalid_input"
