"""The base model every wire type shares: frozen, camelCase on the wire."""

from __future__ import annotations

from datetime import UTC, datetime
from functools import lru_cache

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class WireModel(BaseModel):
    """A frozen model that reads and writes camelCase JSON and accepts snake_case in Python."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        frozen=True,
        extra="forbid",
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
