"""`agentq` with an OpenTelemetry SDK tracer provider whose in-memory exporter's
spans are written, as JSON, to ``$AGENTQ_TEST_SPANS/<pid>.json`` when the
process exits (tests/test_traces.py runs workers and dispatches through it)."""

from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)


def _dump() -> None:
    spans = []
    for span in exporter.get_finished_spans():
        context = span.get_span_context()
        assert context is not None
        spans.append({
            "name": span.name,
            "kind": span.kind.name,
            "trace": f"{context.trace_id:032x}",
            "span": f"{context.span_id:016x}",
            "parent": f"{span.parent.span_id:016x}" if span.parent else None,
            "links": [f"{link.context.span_id:016x}" for link in span.links],
            "attributes": dict(span.attributes or {}),
            "events": [event.name for event in span.events],
            "status": span.status.status_code.name,
            "start": span.start_time,
            "end": span.end_time,
        })
    out = Path(os.environ["AGENTQ_TEST_SPANS"]) / f"{os.getpid()}.json"
    out.write_text(json.dumps(spans))


atexit.register(_dump)

if __name__ == "__main__":
    from agentq.cli import main

    sys.exit(main(sys.argv[1:]))
