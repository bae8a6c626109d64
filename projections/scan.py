"""Finding keys by pattern, for the whole-log commands.

A SCAN visits every key of the key space (of every node, on a cluster: redis-py's
cluster client scans each primary), whatever its pattern. So a command that
needs the keys of many partitions scans once for all of them, never once per
partition.
"""

from __future__ import annotations

from collections import defaultdict

from redis.asyncio import Redis

from agentq.eventlog.keys import Keys


def glob_escape(text: str) -> str:
    """``text`` matched literally in a SCAN pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


async def scan_keys(redis: Redis, pattern: str) -> list[str]:
    """Every key matching ``pattern``, in no order (a key may come twice)."""
    return [key async for key in redis.scan_iter(match=pattern, count=1000)]


def agent_of_key(prefix: str, key: str) -> str | None:
    """The agent whose partition ``key`` belongs to (``<prefix>:{<agent>}:…``), or None."""
    head = f"{prefix}:{{"
    if not key.startswith(head):
        return None
    end = key.find("}", len(head))
    return key[len(head):end] if end > 0 else None


async def view_keys(redis: Redis, keys: Keys) -> dict[str, set[str]]:
    """Per agent, every index key of its partition that exists, live or a
    rebuild's (one SCAN for all partitions)."""
    found: dict[str, set[str]] = defaultdict(set)
    for key in await scan_keys(redis, glob_escape(keys.prefix) + ":{*}:*idx:*"):
        agent = agent_of_key(keys.prefix, key)
        if agent is not None:
            found[agent].add(key)
    return found
