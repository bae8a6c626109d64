"""Write the JSON Schemas of every event type, the job view, the tool inputs and
the config to ``schemas/json/``. Run ``python -m agentq.schemas.export`` after changing
a model; a test fails while the committed files are stale."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from agentq.schemas import tools
from agentq.schemas.config import Config
from agentq.schemas.events import (
    CURRENT_VERSIONS,
    EVENT_MODELS,
    SCHEDULE_EVENT_MODELS,
    StoredEvent,
    StoredScheduleEvent,
)
from agentq.schemas.job import JobView

OUT = Path(__file__).parent / "json"


def documents() -> dict[str, dict[str, Any]]:
    """File name -> JSON Schema, for every committed schema."""
    models: dict[str, type[BaseModel]] = {
        "job-view.json": JobView,
        "stored-event.json": StoredEvent,
        "stored-schedule-event.json": StoredScheduleEvent,
        "config.json": Config,
        "tool-queue_dispatch.json": tools.DispatchInput,
        "tool-queue_status.json": tools.StatusInput,
        "tool-queue_list.json": tools.ListInput,
        "tool-queue_activity.json": tools.ActivityInput,
        "tool-queue_wait.json": tools.WaitInput,
        "tool-queue_history.json": tools.HistoryInput,
        "tool-queue_approve.json": tools.ApproveInput,
        "tool-queue_reject.json": tools.RejectInput,
    }
    docs = {name: model.model_json_schema(by_alias=True) for name, model in models.items()}
    for name, model in EVENT_MODELS.items():
        schema = model.model_json_schema(by_alias=True)
        schema["description"] = (schema.get("description", "") + f" (data of {name}, "
                                 f"version {CURRENT_VERSIONS[name]})").strip()
        docs[f"event-{name}.json"] = schema
    for name, model in SCHEDULE_EVENT_MODELS.items():
        schema = model.model_json_schema(by_alias=True)
        schema["description"] = (schema.get("description", "") + f" (data of {name}, "
                                 "version 1, in a schedule log)").strip()
        docs[f"event-{name}.json"] = schema
    return docs


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def stale() -> list[str]:
    """Names of committed schema files that differ from the models (or are missing/extra)."""
    docs = documents()
    wrong = [name for name, schema in docs.items()
             if not (OUT / name).exists() or (OUT / name).read_text() != render(schema)]
    extra = [p.name for p in OUT.glob("*.json") if p.name not in docs]
    return sorted(wrong + extra)


def main() -> int:
    OUT.mkdir(exist_ok=True)
    docs = documents()
    for path in OUT.glob("*.json"):
        if path.name not in docs:
            path.unlink()
    for name, schema in docs.items():
        (OUT / name).write_text(render(schema))
    print(f"wrote {len(docs)} schemas to {OUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
