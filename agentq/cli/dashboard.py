"""``agentq dashboard``: the operators' web page (agentq/dashboard/)."""

from __future__ import annotations

from agentq.cli._base import EXIT_OK, Commands, Run
from agentq.cli.operate import add_metrics_port, metrics_served

# The dashboard's modules (Starlette, Jinja2, uvicorn) are imported by the handler
# alone: `agentq --help` does not pay for them.
_DEFAULT_PORT = 8321


def add_dashboard(commands: Commands) -> None:
    p = commands.add(
        "dashboard",
        summary="serve the web dashboard (agents, jobs, dead letters, approvals, live)",
        description=(
            "Serve a web page at http://HOST:PORT/: agents (status, counts, live workers),\n"
            "jobs (the filters and paging of `list`), each job's view, timeline and graph,\n"
            "dead letters with retry and pending approvals with approve and reject, all\n"
            "updating live. It asks for a token (`agentq tokens add AGENT`): what it shows\n"
            "and allows follows the token's agent, as with the tools. Put it behind a TLS\n"
            "reverse proxy to serve it beyond this machine."
        ),
        examples=["agentq dashboard                       # http://127.0.0.1:8321/",
                  "agentq tokens add main                 # a token to log in with",
                  "agentq dashboard --host 0.0.0.0 --port 8080   # every interface: add TLS"],
        handler=_dashboard,
    )
    p.add_argument("--port", type=int, default=_DEFAULT_PORT,
                   help=f"port to listen on (default {_DEFAULT_PORT}; 0: any free port)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1)")
    add_metrics_port(p)


async def _dashboard(run: Run) -> int:
    from agentq.dashboard.serve import check_address, serve

    host, port = run.args.host, run.args.port
    check_address(host, port)  # before connecting: a clear refusal, exit 2
    async with run.connect() as q, metrics_served(q, run):
        await serve(q, host, port, err=run.err)
    return EXIT_OK
