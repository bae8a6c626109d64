"""The base model every wire type shares: frozen, camelCase on the wire."""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import UTC, datetime
from functools import lru_cache

import orjson
from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

from agentq.schemas.errors import InvalidInput


class WireModel(BaseModel):
    """A frozen model that reads and writes camelCase JSON and accepts snake_case in Python."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        frozen=True,
        extra="forbid",
        # JSON has no Infinity or NaN: a float field refuses them rather than
        # storing what orjson would write as null.
        allow_inf_nan=False,
    )

    def wire(self) -> dict[str, object]:
        """The model as a JSON-ready dict with camelCase keys."""
        return self.model_dump(mode="json", by_alias=True)


def _iso(micros: int) -> str:
    seconds, fraction = divmod(micros, 1_000_000)
    return f"{_iso_seconds(seconds)}.{fraction:06d}Z"


# Times come in runs (a batch of jobs, a job's history of 10,000 events): few
# distinct seconds. The date and time of day are made once a second, the
# fraction each time (in integers: exact, where dividing by 1e6 was not
# beyond the year 2200).
@lru_cache(maxsize=4096)
def _iso_seconds(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).replace(tzinfo=None).isoformat()


def micros_to_iso(micros: int | None) -> str | None:
    """An epoch-microseconds integer as an ISO-8601 UTC string; None stays None."""
    return None if micros is None else _iso(micros)


def iso_to_micros(text: str) -> int:
    """An ISO-8601 time (naive means UTC) as epoch microseconds."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1_000_000)


# What orjson (and so the log) can carry: 64-bit integers, signed or not.
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1
_CONTAINERS = (dict, list, tuple)
_MAX_DEPTH = 255  # orjson writes no deeper
_NOT_FINITE = "not a finite number (JSON has no Infinity or NaN)"
_TOO_BIG = "an integer beyond 64 bits"


def _text_fault(text: str) -> str | None:
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "a lone surrogate is not text (no UTF-8 encodes it)"
    return None


def _printable(key: object) -> str:
    """A key as a path part that is itself valid text (lone surrogates escaped)."""
    return str(key).encode("utf-8", "backslashreplace").decode("utf-8")


def json_fault(value: object, path: str = "") -> tuple[str, str] | None:
    """The first place in ``value`` (document order) that JSON cannot carry
    faithfully, as (path, reason): a non-finite float, an integer beyond 64 bits,
    text with a lone surrogate, nesting deeper than orjson writes. None when it
    is all fit."""
    found = _fault(value, 0)
    if found is None:
        return None
    parts, reason = found
    parts.reverse()  # collected innermost first
    return ".".join([path, *parts] if path else parts), reason


def _fault(item: object, depth: int) -> tuple[list[str], str] | None:
    # Recursive, and paths are built only for a fault: quick on big fit input.
    reason: str | None = None
    if isinstance(item, str):
        reason = _text_fault(item)
    elif isinstance(item, bool):
        return None
    elif isinstance(item, float):
        reason = None if math.isfinite(item) else _NOT_FINITE
    elif isinstance(item, int):
        reason = None if _INT_MIN <= item <= _INT_MAX else _TOO_BIG
    elif isinstance(item, _CONTAINERS):
        if depth >= _MAX_DEPTH:
            return [], f"nested more than {_MAX_DEPTH} levels deep"
        pairs: Iterable[tuple[object, object]] = (
            item.items() if isinstance(item, dict) else enumerate(item))
        for key, child in pairs:
            if isinstance(key, str) and (reason := _text_fault(key)):
                return [_printable(key)], reason
            inner = _fault(child, depth + 1)
            if inner is not None:
                inner[0].append(_printable(key))
                return inner
    return ([], reason) if reason else None


def check_json_input(data: object) -> None:
    """Raise InvalidInput naming the first place of a tool's raw input JSON cannot
    carry; top-level names are given in their camelCase spelling.

    Fast when all is well (it runs on every dispatch): orjson refuses lone
    surrogates, integers beyond 64 bits and deep nesting by itself, and writes
    a non-finite number as null, so only input whose JSON holds a null needs
    the walk that finds the place."""
    if not isinstance(data, dict):
        return  # not an object: the model refuses it
    try:
        fit = b"null" not in orjson.dumps(data)
    except TypeError:  # orjson.JSONEncodeError; or a key that is no string
        fit = False
    fault = None if fit else json_fault(data)
    if fault is not None:
        where, reason = fault
        first, dot, rest = where.partition(".")
        where = to_camel(first) + dot + rest if "_" in first else where
        raise InvalidInput(f"Invalid input: {where}: {reason}", path=where)
