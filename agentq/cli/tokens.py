"""``agentq tokens add|list|revoke``: the bearer tokens of ``agentq mcp --http``
(and of the dashboard). Only system agents manage them; the store is
``eventlog/tokens.py``, which keeps each token's SHA-256, never the token."""

from __future__ import annotations

from typing import TYPE_CHECKING

from agentq import _render as render
from agentq.cli._base import EXIT_OK, PROG, Commands, Run, agent_id
from agentq.schemas.errors import NotFound, Unauthorized

if TYPE_CHECKING:
    from agentq.client import Client


def add_tokens(commands: Commands) -> None:
    group = commands.group(
        "tokens",
        summary="bearer tokens for MCP over HTTP",
        description=(
            "The tokens remote agents present to `agentq mcp --http` (Authorization: Bearer\n"
            "TOKEN). A token names one agent: every tool call made with it acts as that\n"
            "agent. Only the SHA-256 of a token is stored. System agents only."
        ),
        examples=[
            "agentq tokens add planner",
            "agentq tokens list",
            "agentq tokens revoke aqt.Xy3k9QbZ     # one token, by its prefix",
            "agentq tokens revoke planner          # every token of an agent",
        ],
    )
    add = group.add(
        "add",
        summary="make a new token for an agent (printed once)",
        description=(
            "Make a new token for AGENT and print it. It is shown this once: agentq keeps\n"
            "only its SHA-256, so a lost token cannot be shown again (revoke it and add\n"
            "another). With --json, {token, agent, prefix, createdAt}."
        ),
        examples=["agentq tokens add planner"],
        handler=_tokens_add,
    )
    add.add_argument("agent", metavar="AGENT", type=agent_id,
                     help="the agent every call made with the token acts as")
    group.add(
        "list",
        summary="list tokens (agent, prefix, created; never the token)",
        description=(
            "Every token's agent, prefix (its first 12 characters) and creation time,\n"
            "oldest first. With --json, {\"tokens\": [{agent, prefix, createdAt}]}."
        ),
        examples=["agentq tokens list"],
        handler=_tokens_list,
    )
    revoke = group.add(
        "revoke",
        summary="revoke every token of an agent, or one token by its prefix",
        description=(
            "Revoke the token whose prefix is PREFIX (as `tokens list` shows it, e.g.\n"
            "aqt.Xy3k9QbZ), or every token of AGENT. A revoked token is refused from the\n"
            "next request on. With --json, {\"revoked\": [{agent, prefix, createdAt}]}.\n"
            "Nothing matched: exit 3."
        ),
        examples=["agentq tokens revoke aqt.Xy3k9QbZ", "agentq tokens revoke planner"],
        handler=_tokens_revoke,
    )
    revoke.add_argument("target", metavar="AGENT|PREFIX",
                        help="an agent id, or a token's prefix (aqt.…)")


def _require_system(q: Client, run: Run, command: str) -> None:
    if not q.config.is_system(q.caller_or_operator(run.caller)):
        raise Unauthorized(f"Unauthorized: {command} requires a system agent.")


async def _tokens_add(run: Run) -> int:
    agent: str = run.args.agent
    async with run.connect() as q:
        _require_system(q, run, "tokens add")
        issued = await q.tokens.add(agent)
    run.emit({"token": issued.token, **issued.entry.wire()}, issued.token)
    run.note(f"{PROG}: a token for agent {agent} (prefix {issued.entry.prefix}); it is not "
             "shown again. Remote agents send it as: Authorization: Bearer TOKEN")
    return EXIT_OK


async def _tokens_list(run: Run) -> int:
    async with run.connect() as q:
        _require_system(q, run, "tokens list")
        entries = await q.tokens.entries()
    text = (render.table(["AGENT", "PREFIX", "CREATED"],
                         [[e.agent, e.prefix, render.time_and_age(e.created_at)]
                          for e in entries], width=run.width)
            if entries else f"No tokens yet. Make one with: {PROG} tokens add AGENT")
    run.emit({"tokens": [e.wire() for e in entries]}, text)
    return EXIT_OK


async def _tokens_revoke(run: Run) -> int:
    target: str = run.args.target
    async with run.connect() as q:
        _require_system(q, run, "tokens revoke")
        revoked = await q.tokens.revoke(target)
    if not revoked:
        raise NotFound(f"No token matches {target}: give an agent id or a prefix as "
                       f"`{PROG} tokens list` shows it")
    run.emit({"revoked": [e.wire() for e in revoked]},
             "\n".join(f"Revoked token {e.prefix} of agent {e.agent}" for e in revoked))
    return EXIT_OK
