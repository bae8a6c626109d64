"""agentq's tools over MCP, on the official SDK's low-level server.

- ``tools.py``: how each tool presents itself (titles, descriptions, annotations,
  schemas) and the instructions naming the caller;
- ``server.py``: the server both transports share (tool calls as the request's
  caller, ``queue_wait``'s progress notifications), and stdio;
- ``http.py``: Streamable HTTP at ``/mcp`` behind bearer tokens (``agentq tokens``);
- ``tasks.py``: the MCP Tasks extension (a dispatch as a task whose id is the job's).

Only the ``mcp`` command imports this package: the SDK takes most of a second to
import, which no other command should pay.
"""

from agentq.mcp.server import PROGRESS_SECONDS, build_server, instructions_for, serve_stdio
from agentq.mcp.tools import SPECS, ToolSpec, instructions, tool_list

__all__ = [
    "PROGRESS_SECONDS",
    "SPECS",
    "ToolSpec",
    "build_server",
    "instructions",
    "instructions_for",
    "serve_stdio",
    "tool_list",
]
