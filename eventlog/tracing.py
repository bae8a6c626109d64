"""OpenTelemetry traces, when the process has a tracer provider.

SPEC part two, "Traces": a dispatch is a ``send <agent>`` span (PRODUCER), a
worker running an attempt a ``process <agent>`` span (CONSUMER) that is the
send span's child and links to it, and a dependency releasing a dependent a
``release <agent>`` span in the dependent's trace, per the messaging semantic
conventions (``messaging.system`` "agentq", the agent as the destination, the
job id as the message id). The W3C ``traceparent`` of the send span travels
with the job, in its spec (and so in its ``JobDispatched`` event), and reaches
its handler: ``TRACEPARENT`` for ``--exec``, the ``traceparent`` header for
``--http``, the current context for a Python handler. A dispatch made inside
a handler, or by a process started with ``TRACEPARENT`` in its environment,
continues the trace.

agentq never imports OpenTelemetry itself: tracing is on when the
application has (``opentelemetry.trace`` is imported and its tracer provider
is a real one, not the API's default). Otherwise every function here returns
at once, after a dictionary look-up; a job's stored ``traceparent`` is still
handed on to its handler, so a trace crosses a process that records nothing.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

SYSTEM = "agentq"
WORKERS_GROUP = "workers"
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
# The tracer of the provider it came from: providers are few (one per process,
# a few in tests).
_tracers: dict[int, tuple[Any, Any]] = {}


def _trace() -> Any:
    """``opentelemetry.trace`` when the application imported it, else None."""
    return sys.modules.get("opentelemetry.trace")


def tracer() -> Any:
    """The tracer to record spans with, or None when tracing is off."""
    trace = _trace()
    if trace is None:
        return None
    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return None
    cached = _tracers.get(id(provider))
    if cached is None or cached[0] is not provider:
        cached = (provider, provider.get_tracer("agentq", _version()))
        _tracers[id(provider)] = cached
    return cached[1]


def _version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("agentq")
    except PackageNotFoundError:
        return None


def valid(traceparent: object) -> str | None:
    """``traceparent`` when it is a W3C traceparent header's value, else None."""
    if isinstance(traceparent, str) and _TRACEPARENT.match(traceparent):
        return traceparent
    return None


_propagators: list[Any] = []


def _propagator() -> Any:
    if not _propagators:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        _propagators.append(TraceContextTextMapPropagator())
    return _propagators[0]


def _context_of(traceparent: str | None) -> Any:
    """The OpenTelemetry context a stored traceparent stands for (None: none).
    Built from the checked text directly: the propagator's extract costs a job
    about 5 µs more (a regex and a context per call)."""
    if traceparent is None:
        return None
    trace = _trace()
    context = trace.SpanContext(
        trace_id=int(traceparent[3:35], 16), span_id=int(traceparent[36:52], 16),
        is_remote=True, trace_flags=trace.TraceFlags(int(traceparent[53:55], 16)))
    if not context.is_valid:
        return None
    return trace.set_span_in_context(trace.NonRecordingSpan(context))


def _traceparent_of(span: Any) -> str | None:
    trace = _trace()
    carrier: dict[str, str] = {}
    _propagator().inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent")


def _dispatch_parent(trace: Any) -> Any:
    """What a dispatch continues: the current span, else ``TRACEPARENT`` from the
    environment (a handler's process started by an ``--exec`` worker)."""
    if trace.get_current_span().get_span_context().is_valid:
        return None  # the current context
    return _context_of(valid(os.environ.get("TRACEPARENT")))


def _error_type(error: BaseException) -> str:
    return str(getattr(error, "code", "") or type(error).__qualname__)


class Sends:
    """The send spans of one dispatch batch, and the traceparent each job carries.

    ``traceparents[i]`` is None when the job carries none."""

    def __init__(self, spans: list[Any], traceparents: list[str | None]) -> None:
        self.spans = spans
        self.traceparents = traceparents

    def end(self, error: BaseException | None = None) -> None:
        """End every span; with ``error`` (the dispatch was refused or failed),
        each says so."""
        if not self.spans:
            return
        status = _trace().StatusCode.ERROR if error is not None else None
        for span in self.spans:
            if error is not None:
                span.set_attribute("error.type", _error_type(error))
                span.set_status(status, str(error))
            span.end()


def start_sends(jobs: Sequence[tuple[str, str]]) -> Sends | None:
    """Start a ``send <agent>`` span per ``(target, job id)`` of a dispatch batch;
    None when no job carries a trace. Without a tracer, a ``TRACEPARENT`` in the
    environment is carried as it is (this process records nothing)."""
    tracer_ = tracer()
    if tracer_ is None:
        inherited = valid(os.environ.get("TRACEPARENT"))
        return Sends([], [inherited] * len(jobs)) if inherited else None
    trace = _trace()
    parent = _dispatch_parent(trace)
    spans, traceparents = [], []
    for target, job_id in jobs:
        span = tracer_.start_span(
            f"send {target}", context=parent, kind=trace.SpanKind.PRODUCER,
            attributes={
                "messaging.system": SYSTEM,
                "messaging.operation.type": "send",
                "messaging.operation.name": "send",
                "messaging.destination.name": target,
                "messaging.message.id": job_id,
            },
        )
        spans.append(span)
        traceparents.append(_traceparent_of(span))
    return Sends(spans, traceparents)


def start_process(agent: str, job_id: str, attempt: int, traceparent: str | None,
                  worker_id: str) -> Any:
    """Start the ``process <agent>`` span of one attempt (None when tracing is
    off): the child of the job's send span, and linked to it. Make it current
    with :func:`current` while the handler runs."""
    tracer_ = tracer()
    if tracer_ is None:
        return None
    trace = _trace()
    parent = _context_of(valid(traceparent))
    links = []
    if parent is not None:
        sent = trace.get_current_span(parent).get_span_context()
        if sent.is_valid:
            links.append(trace.Link(sent))
    else:
        # A job dispatched without a trace starts one; it is not the child of
        # whatever happens to be current in the worker.
        parent = trace.set_span_in_context(trace.INVALID_SPAN)
    return tracer_.start_span(
        f"process {agent}", context=parent, kind=trace.SpanKind.CONSUMER, links=links,
        attributes={
            "messaging.system": SYSTEM,
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": agent,
            "messaging.message.id": job_id,
            "messaging.consumer.group.name": WORKERS_GROUP,
            "messaging.client.id": worker_id,
            "agentq.attempt": attempt,
        },
    )


@contextlib.contextmanager
def current(span: Any) -> Iterator[None]:
    """Make ``span`` the current span (nothing when it is None); ending it is
    the caller's business (:func:`end_process`)."""
    if span is None:
        yield
        return
    with _trace().use_span(span, end_on_exit=False, record_exception=False,
                           set_status_on_exception=False):
        yield


def end_process(span: Any, outcome: str, detail: str | None = None) -> None:
    """End an attempt's span with its outcome (a worker's: completed, retrying,
    failed, timeout, cancelled, released, refused); an attempt that failed sets
    ``error.type``, and a retry is an event on the span."""
    if span is None or not span.is_recording():
        return
    trace = _trace()
    span.set_attribute("agentq.outcome", outcome)
    if outcome in ("retrying", "failed", "timeout"):
        span.set_attribute("error.type", "timeout" if outcome == "timeout" else "handler_failed")
        span.set_status(trace.StatusCode.ERROR, (detail or outcome)[:500])
        if outcome == "retrying":
            span.add_event("retry scheduled")
    elif outcome == "cancelled":
        span.set_attribute("error.type", "cancelled")
        span.set_status(trace.StatusCode.ERROR, "the attempt was cancelled or reclaimed")
    span.end()


def handler_traceparent(job_traceparent: str | None) -> str | None:
    """The traceparent a handler's process or request gets: the current span's
    (the attempt's, when tracing is on), else the one the job carries."""
    trace = _trace()
    if trace is not None and tracer() is not None:
        span = trace.get_current_span()
        if span.get_span_context().is_valid:
            return _traceparent_of(span)
    return valid(job_traceparent)


def record_release(agent: str, job_id: str, dependency_id: str, outcome: str,
                   dependent_traceparent: str | None, dependency_traceparent: str | None,
                   started_ns: int) -> None:
    """A ``release <agent>`` span in the dependent's trace: from the dependency's
    end (``started_ns``) to its resolution here; linked to the dependency's send."""
    tracer_ = tracer()
    if tracer_ is None:
        return
    trace = _trace()
    parent = _context_of(valid(dependent_traceparent))
    links = []
    dependency = _context_of(valid(dependency_traceparent))
    if dependency is not None:
        links.append(trace.Link(trace.get_current_span(dependency).get_span_context()))
    span = tracer_.start_span(
        f"release {agent}", context=parent, kind=trace.SpanKind.INTERNAL, links=links,
        start_time=started_ns,
        attributes={
            "messaging.system": SYSTEM,
            "messaging.destination.name": agent,
            "messaging.message.id": job_id,
            "agentq.dependency.id": dependency_id,
            "agentq.outcome": outcome,
        },
    )
    if outcome == "failed":
        span.set_attribute("error.type", "dependency_failed")
        span.set_status(trace.StatusCode.ERROR, f"dependency {dependency_id} did not complete")
    span.end()


def spec_traceparent(spec: Mapping[str, Any]) -> str | None:
    """The traceparent a job's spec carries, if any."""
    return valid(spec.get("traceparent"))


__all__ = [
    "Sends",
    "current",
    "end_process",
    "handler_traceparent",
    "record_release",
    "spec_traceparent",
    "start_process",
    "start_sends",
    "tracer",
    "valid",
]
