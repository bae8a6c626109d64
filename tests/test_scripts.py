"""How the scripts are assembled: each carries only the prelude helpers it
calls (directly or through another helper), since every helper defined costs
time on every call; and each compiles on a real server."""

from __future__ import annotations

import re

import redis

from agentq.eventlog.scripts import SCRIPT_NAMES, script_source

HELPER = re.compile(r"\baq_\w+")
DEFINED = re.compile(r"^local function (aq_\w+)\(", re.M)


def test_each_script_defines_exactly_the_helpers_it_calls() -> None:
    for name in SCRIPT_NAMES:
        source = script_source(name)
        defined = DEFINED.findall(source)
        assert len(defined) == len(set(defined)), name
        # Every helper named anywhere is defined, and every one defined is named
        # somewhere other than its own definition.
        named = set(HELPER.findall(DEFINED.sub("", source)))
        assert named == set(defined), (name, named ^ set(defined))


def test_each_script_compiles(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        for name in SCRIPT_NAMES:
            client.script_load(script_source(name))
    finally:
        client.close()
