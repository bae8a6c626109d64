"""The base model every wire type shares: frozen, camelCase on the wire."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from functools import lru_cache

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


@lru_cache(maxsize=4096)
def _iso(micros: int) -> str:
    moment = datetime.fromtimestamp(micros / 1_000_000, tz=UTC)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def micros_to_iso(micros: int | None) -> str | None:
    """An epoch-microseconds integer as an ISO-8601 UTC string; None stays None."""
    # Cached: a batch of jobs shares its times, and a view shows several.
    return None if micros is None else _iso(micros)


def iso_to_micros(text: str) -> int:
    """An ISO-8601 time (naive means UTC) as epoch microseconds."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1_000_000)


# What orjson (and so the log) can carry: 64-bit integers, signed or not.
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1


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
    text with a lone surrogate. None when it is all fit."""
    stack: list[tuple[str, object]] = [(path, value)]
    while stack:
        where, item = stack.pop()
        reason: str | None = None
        if isinstance(item, str):
            reason = _text_fault(item)
        elif isinstance(item, bool):
            continue
        elif isinstance(item, int):
            if not _INT_MIN <= item <= _INT_MAX:
                reason = "an integer beyond 64 bits"
        elif isinstance(item, float):
            if not math.isfinite(item):
                reason = "not a finite number (JSON has no Infinity or NaN)"
        elif isinstance(item, dict):
            children: list[tuple[str, object]] = []
            for key, child in item.items():
                inner = f"{where}.{_printable(key)}" if where else _printable(key)
                if isinstance(key, str) and (reason := _text_fault(key)):
                    return inner, reason
                children.append((inner, child))
            stack.extend(reversed(children))
        elif isinstance(item, list | tuple):
            stack.extend(reversed([(f"{where}.{i}" if where else str(i), child)
                                   for i, child in enumerate(item)]))
        if reason is not None:
            return where, reason
    return None


def check_json_input(data: object) -> None:
    """Raise InvalidInput naming the first place of a tool's raw input JSON cannot
    carry; top-level names are given in their camelCase spelling."""
    if isinstance(data, dict):
        data = {to_camel(k) if isinstance(k, str) and not _text_fault(k) else k: v
                for k, v in data.items()}
    fault = json_fault(data)
    if fault is not None:
        where, reason = fault
        raise InvalidInput(f"Invalid input: {where}: {reason}", path=where)
