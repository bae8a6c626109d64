"""``agentq dashboard``: a web page for operators, over the same client as the tools.

:func:`dashboard_app` is the ASGI app (Starlette); :func:`serve` runs it with
uvicorn until stopped. docs/architecture.md ("The dashboard") says how it is built.
"""

from agentq.dashboard.app import Dashboard, dashboard_app
from agentq.dashboard.serve import serve

__all__ = ["Dashboard", "dashboard_app", "serve"]
