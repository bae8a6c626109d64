"""The read side: the projector (events -> views), the list and activity
queries, rebuilding the views (``projections.rebuild``), and the audit
against the log."""

from agentq.projections.activity import activity
from agentq.projections.audit import verify
from agentq.projections.projection import Projection
from agentq.projections.queries import list_jobs

__all__ = ["Projection", "activity", "list_jobs", "verify"]
