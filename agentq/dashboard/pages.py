"""What each page shows, read through the client as the tools read it: the page's
data for one caller, ready for its template. Nothing here decides who may see
what; the client does (``agentq/_access.py``), exactly as for the tools."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import orjson

from agentq import _access as access
from agentq.client import Client
from agentq.dashboard._graph import Node, job_graph
from agentq.eventlog import reader
from agentq.schemas.job import JobView, agent_of_job
from agentq.schemas.tools import ListOutput

# The activity counts shown per agent, in a job's order of life, with their labels.
COUNTS = (("pendingApproval", "pending approval"), ("waitingDependencies", "waiting"),
          ("delayed", "delayed"), ("queued", "queued"), ("active", "active"),
          ("completed", "completed"), ("failed", "failed"), ("cancelled", "cancelled"))
# The most children and dependents drawn on a job's page.
GRAPH_NEIGHBOURS = 30


@dataclass(frozen=True, slots=True)
class JobsQuery:
    """``list``'s filters and paging, as a page's query string carries them."""

    agent: str | None = None
    dispatched_by: str | None = None
    states: tuple[str, ...] = ()
    limit: int = 20
    cursor: str | None = None

    @classmethod
    def of(cls, params: Mapping[str, str], states: Sequence[str]) -> JobsQuery:
        """From a query string; a malformed limit is left for ``list`` to refuse."""
        raw_limit = params.get("limit") or "20"
        limit = int(raw_limit) if raw_limit.lstrip("-").isdigit() else -1
        return cls(params.get("agent") or None, params.get("dispatchedBy") or None,
                   tuple(s for s in states if s), limit, params.get("cursor") or None)

    def href(self, path: str, cursor: str | None) -> str:
        """The link to this query's page at ``cursor`` (None: the first page)."""
        pairs: list[tuple[str, str]] = []
        if self.agent:
            pairs.append(("agent", self.agent))
        if self.dispatched_by:
            pairs.append(("dispatchedBy", self.dispatched_by))
        pairs += [("state", s) for s in self.states]
        if self.limit != 20:
            pairs.append(("limit", str(self.limit)))
        if cursor:
            pairs.append(("cursor", cursor))
        return f"{path}?{urlencode(pairs)}" if pairs else path


async def jobs_page(q: Client, who: str, query: JobsQuery) -> ListOutput:
    """One page of ``list`` for ``who``: the client's own query, filters and
    cursor as given (InvalidInput as ``list`` raises it)."""
    return await q.list(caller=who, agent=query.agent, dispatched_by=query.dispatched_by,
                        state=list(query.states) or None, limit=query.limit,
                        cursor=query.cursor)


async def agents_page(q: Client, who: str) -> dict[str, Any]:
    """``activity`` for ``who``: the agents it may see."""
    return await q.activity(caller=who)


@dataclass(frozen=True, slots=True)
class JobPage:
    view: JobView
    events: list[dict[str, Any]]
    graph: str
    related: list[str]  # the ids whose events change this page
    result_text: str | None


async def job_page(q: Client, who: str, job_id: str) -> JobPage:
    """A job's view, history and neighbourhood as ``who`` may see them."""
    view = await q.status(job_id, caller=who)
    events = [event.wire() for event in await q.history(job_id, caller=who)]
    children, dependents = await _neighbours(q, job_id)
    system = q.config.is_system(who)
    related = [*children, *dependents]
    records = await reader.read_records(
        q.redis, [(q.partition(agent_of_job(i) or "-"), i) for i in related]) if related else []
    seen: dict[str, Node] = {}
    for other, record in zip(related, records, strict=True):
        if record and (system or access.may_view(who, orjson.loads(record["spec"]))):
            label = orjson.loads(record["spec"]).get("label")
            seen[other] = Node(other, record.get("state"), label)
        else:
            seen[other] = Node(other, None)
    parent = None
    if view.parent_job_id:
        parent = await _node(q, who, view.parent_job_id)
    graph = job_graph(
        Node(view.job_id, view.state, view.label),
        parent=parent,
        dependencies=[Node(d, dep.state) for d, dep in view.dependencies.items()]
        or [Node(d, None) for d in view.depends_on],
        dependents=[seen[d] for d in dependents],
        children=[seen[c] for c in children],
    )
    result_text = None
    if view.result is not None:
        result_text = (view.result if isinstance(view.result, str)
                       else orjson.dumps(view.result, option=orjson.OPT_INDENT_2).decode())
    return JobPage(view, events, graph, [job_id, *view.depends_on, *related], result_text)


async def _node(q: Client, who: str, job_id: str) -> Node:
    try:
        other = await q.status(job_id, caller=who)
    except Exception:  # not visible to who, or gone: drawn without its state
        return Node(job_id, None)
    return Node(other.job_id, other.state, other.label)


async def _neighbours(q: Client, job_id: str) -> tuple[list[str], list[str]]:
    """(children, dependents still registered) of ``job_id``, at most
    :data:`GRAPH_NEIGHBOURS` of each, sorted (job ids sort by creation time)."""
    part = q.partition(agent_of_job(job_id) or "-")
    async with q.redis.pipeline(transaction=False) as pipe:
        pipe.srandmember(part.children(job_id), GRAPH_NEIGHBOURS)
        pipe.srandmember(part.dependents(job_id), GRAPH_NEIGHBOURS)
        children, dependents = await pipe.execute()
    return sorted(children or []), sorted(dependents or [])
