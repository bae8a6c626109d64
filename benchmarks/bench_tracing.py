"""What traces and metrics cost a worker: the drain rate of bench_drain, without
and with an OpenTelemetry tracer provider, and with ``/metrics`` served.

    .venv/bin/python -m benchmarks.bench_tracing [--n 20000] [--runs 3] [--concurrency 64]

Each drain runs in a process of its own (a tracer provider cannot be unset),
on one throwaway redis-server, the three kinds interleaved so that drift on a
shared machine hits each alike:

- ``plain``: no tracer provider (what agentq does without OpenTelemetry
  configured);
- ``traced``: the SDK's TracerProvider with a BatchSpanProcessor whose
  exporter drops the spans (every job dispatched under a send span, so each
  carries a traceparent, and run under a process span);
- ``metrics``: no tracer, and ``/metrics`` served (the histograms observed),
  not scraped.

Prints each kind's median jobs/s and its ratio to ``plain``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

KINDS = ("plain", "traced", "metrics")


def _child(kind: str, url: str, n: int, concurrency: int) -> dict[str, Any]:
    if kind == "traced":
        from opentelemetry import trace
        from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )

        class Dropped(SpanExporter):
            def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
                return SpanExportResult.SUCCESS

        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(Dropped()))
        trace.set_tracer_provider(provider)
    from benchmarks.bench_drain import RoundTripCounter, drain_once

    async def run() -> dict[str, Any]:
        server = None
        if kind == "metrics":
            import agentq
            from agentq.consumers.metrics import serve
            from agentq.schemas.config import Config

            async with agentq.connect(url, Config.model_validate({"keyPrefix": "bench"})) as q:
                server = serve(q.redis, q.keys, "127.0.0.1", 0)
                try:
                    return await drain_once(url, n, concurrency, RoundTripCounter(), True)
                finally:
                    server.close()
        return await drain_once(url, n, concurrency, RoundTripCounter(), True)

    return asyncio.run(run())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.url, args.n, args.concurrency)))
        return 0
    from benchmarks._server import throwaway_redis

    rates: dict[str, list[float]] = {kind: [] for kind in KINDS}
    with throwaway_redis() as url:
        for run in range(args.runs):
            for kind in KINDS:
                out = subprocess.run(
                    [sys.executable, "-m", "benchmarks.bench_tracing", "--child", kind,
                     "--url", url, "--n", str(args.n), "--concurrency", str(args.concurrency)],
                    capture_output=True, text=True, check=True)
                rate = json.loads(out.stdout.strip().splitlines()[-1])["jobs_per_second"]
                rates[kind].append(rate)
                print(f"run {run + 1} {kind}: {rate:,.0f} jobs/s", file=sys.stderr)
    base = statistics.median(rates["plain"])
    print(f"\nDrain of {args.n:,} no-op jobs, one worker process with its background "
          f"consumers, concurrency {args.concurrency}, median of {args.runs}:")
    for kind in KINDS:
        median = statistics.median(rates[kind])
        print(f"  {kind:<8} {median:>8,.0f} jobs/s  ({median / base:.2f} of plain; runs: "
              + ", ".join(f"{r:,.0f}" for r in rates[kind]) + ")")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
