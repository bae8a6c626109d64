"""Long-running consumers: workers and their handlers, and the background
consumers every worker process hosts (scheduler, stall recovery, dependency
gates, projector, dead-letter alerts)."""

from agentq.consumers.background import Background
from agentq.consumers.handlers import Job, exec_handler, http_handler, python_handler
from agentq.consumers.worker import Worker, WorkerSettings

__all__ = ["Background", "Job", "Worker", "WorkerSettings", "exec_handler", "http_handler",
           "python_handler"]
