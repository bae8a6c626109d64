"""Write the newest benchmark results into the README, between the markers
``<!-- benchmarks:start -->`` and ``<!-- benchmarks:end -->``.

    .venv/bin/python -m benchmarks.readme_table

The tables come from the newest ``benchmarks/results/peers-*.json`` (agentq
against the peers, one run), ``drain-*.json``, ``release-*.json`` and
``views-*.json``, the newest ``scale-*.json`` with the newest ``scale-*-before.json``
(``bench_scale``), and each retention target from the newest ``retention-*.json``
that measured it (``bench_retention``); each table names the file it comes from.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.bench_peers import render
from benchmarks.bench_retention import readme_section as retention_section
from benchmarks.bench_scale import readme_section as scale_section

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
START, END = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"


def newest(kind: str) -> tuple[Path, dict[str, Any]] | None:
    files = sorted(RESULTS.glob(f"{kind}-*.json"))
    return (files[-1], json.loads(files[-1].read_text())) if files else None


def _ms(value: float) -> str:
    return f"{value:.2f}"


def section() -> str:
    parts: list[str] = []
    peers = newest("peers")
    if peers:
        path, report = peers
        parts += [render(report).replace("## ", "### ", 1), "",
                  f"Source: `{path.relative_to(ROOT)}`."]
    drain = newest("drain")
    if drain:
        path, data = drain
        parts += ["", f"### Drain by one worker process (N = {data['n']:,}, concurrency "
                      f"{data['concurrency']}, median of {data['runs']})", "",
                  "| process hosts | jobs/s | round trips per job | client CPU per job |",
                  "|---|---:|---:|---:|"]
        for label, s in data["summary"].items():
            parts.append(f"| {label} | {s['jobs_per_second_median']:,.0f} | "
                         f"{s['round_trips_per_job_median']:.3f} | "
                         f"{s['client_cpu_us_per_job_median']:.0f} µs |")
        parts += ["", f"Source: `{path.relative_to(ROOT)}`."]
    release = newest("release")
    if release:
        path, data = release
        parts += ["", "### Dependency release latency (JobCompleted → dependent's JobQueued)", "",
                  "| scenario | p50 ms | p99 ms |", "|---|---:|---:|"]
        for name, s in data["results"].items():
            parts.append(f"| {name.replace('_', ' ')} ({s['n']:,} pairs) | {_ms(s['p50_ms'])} | "
                         f"{_ms(s['p99_ms'])} |")
        parts += ["", f"Source: `{path.relative_to(ROOT)}`."]
    memory = newest("memory")
    if memory:
        path, data = memory
        parts += ["", f"### Memory per job in Redis (N = {data['n']:,}, task of "
                      f"{data['task_bytes']} bytes)", "",
                  f"Queued: {data['queued_bytes_per_job']:,.0f} bytes; completed, with its state "
                  f"record, its whole history and its place in the views: "
                  f"{data['completed_bytes_per_job']:,.0f} bytes."]
        if "completed_breakdown" in data:
            queued, completed = data["queued_breakdown"], data["completed_breakdown"]
            kinds = [k for k in completed["bytes_per_job"] if k != "other keys"]
            parts += ["", "| bytes per job | " + " | ".join(kinds) + " |",
                      "|---|" + "---:|" * len(kinds)]
            for phase, found in (("queued", queued), ("completed", completed)):
                parts.append(f"| {phase} | " + " | ".join(
                    f"{found['bytes_per_job'].get(k, 0):,.0f}" for k in kinds) + " |")
            parts += ["", f"(`MEMORY USAGE` by kind of key; job records are stored as "
                          f"{completed['record_encoding']}s.)"]
        parts += ["", f"Source: `{path.relative_to(ROOT)}`."]
    views = newest("views")
    if views:
        parts += views_table(*views)
    parts += scale_section(RESULTS, ROOT)
    parts += retention_section(RESULTS, ROOT)
    return "\n".join(parts)


def views_table(path: Path, data: dict[str, Any]) -> list[str]:
    """Status and list latency and the rebuild rate by log size; projection lag."""
    parts = ["", "### The views as the log grows (one call at a time, 300 calls)", "",
             "| events in the log | status p50 / p99 ms | list p50 / p99 ms | "
             "rebuild events/s |", "|---:|---:|---:|---:|"]
    for size in data["results"]["sizes"].values():
        status, listing = size["latency"]["status"], size["latency"]["list"]
        parts.append(f"| {size['events']:,} | {_ms(status['p50_ms'])} / {_ms(status['p99_ms'])} "
                     f"| {_ms(listing['p50_ms'])} / {_ms(listing['p99_ms'])} "
                     f"| {size['rebuild']['events_per_s']:,.0f} |")
    lag = data["results"].get("lag")
    if lag:
        parts += ["", f"Projection lag (event appended → applied to the views) at "
                      f"{lag['achieved_rate']:,.0f} dispatches/s: p50 {_ms(lag['lag']['p50_ms'])} "
                      f"ms, p99 {_ms(lag['lag']['p99_ms'])} ms (the projector waits 50 ms "
                      "after a read that found events, to apply a job's start and end "
                      "together)."]
    parts += ["", f"Source: `{path.relative_to(ROOT)}`."]
    return parts


def main() -> int:
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        print(f"README.md has no {START} … {END} section", file=sys.stderr)
        return 1
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{section()}\n{END}{tail}")
    print("README.md benchmark section updated", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
