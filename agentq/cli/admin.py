"""Commands on the deployment: the agent registry and the embedded server."""

from __future__ import annotations

from agentq import _render as render
from agentq.cli._base import (
    EXIT_FAILED,
    EXIT_OK,
    PROG,
    Commands,
    Run,
)
from agentq.schemas.errors import UnknownAgent

# -- the agent registry ------------------------------------------------------


def add_agents(commands: Commands) -> None:
    group = commands.group(
        "agents",
        summary="list, add and remove known agents",
        description=(
            "The agent registry. Jobs may only be dispatched to known agents: those in the\n"
            "config's agents section, added here, or for which a worker has started."
        ),
        examples=[
            "agentq agents list",
            "agentq agents add researcher",
            "agentq agents add planner --allow researcher --allow writer",
            "agentq agents remove researcher",
        ],
    )
    listing = group.add(
        "list",
        summary="list known agents",
        description=(
            "Known agents and whom each may dispatch to. With --json,\n"
            "{\"agents\": {AGENT: {\"allowAgents\": [...]}}}.\n"
            "--repair first makes the list agree with the agents' own partitions (an\n"
            "agent added while its node or the list's node failed is known but may be\n"
            "missing from the list); it reads every key of every node."
        ),
        examples=["agentq agents list", "agentq agents list --repair"],
        handler=_agents_list,
    )
    listing.add_argument(
        "--repair", action="store_true",
        help="first list again the agents whose partition says they are known (scans every node)",
    )
    add = group.add(
        "add",
        summary="make an agent known",
        description=(
            "Make AGENT known so that jobs may be dispatched to it. Adding it again replaces\n"
            "its --allow list. With --json, {agent, allowAgents}."
        ),
        examples=["agentq agents add researcher",
                  "agentq agents add planner --allow researcher --allow writer"],
        handler=_agents_add,
    )
    add.add_argument("agent", metavar="AGENT", help="an agent id: ^[a-z0-9][a-z0-9_-]{0,63}$")
    add.add_argument("--allow", metavar="A", action="append", default=[],
                     help="an agent AGENT may dispatch to (repeatable; default: any, \"*\")")
    remove = group.add(
        "remove",
        summary="forget an agent",
        description=(
            "Forget AGENT: later dispatches to it are refused. Its jobs and their history\n"
            "stay. With --json, {agent, removed}."
        ),
        examples=["agentq agents remove researcher"],
        handler=_agents_remove,
    )
    remove.add_argument("agent", metavar="AGENT", help="a known agent id")


async def _agents_list(run: Run) -> int:
    async with run.connect() as q:
        if run.args.repair:
            relisted, dropped = await q.repair_agents()
            for agent in relisted:
                run.note(f"{PROG}: agent {agent} was known but not listed; listed again")
            for agent in dropped:
                run.note(f"{PROG}: agent {agent} was listed but is not known; no longer listed")
        agents = await q.agents()
    data = {"agents": {agent: {"allowAgents": allow} for agent, allow in agents.items()}}
    text = (render.agents_table(agents, width=run.width) if agents
            else f"No agents are known yet. Add one with: {PROG} agents add AGENT")
    run.emit(data, text)
    return EXIT_OK


async def _agents_add(run: Run) -> int:
    agent: str = run.args.agent
    allow: list[str] = run.args.allow or ["*"]
    async with run.connect() as q:
        await q.add_agent(agent, allow)
    run.emit({"agent": agent, "allowAgents": allow},
             f"Agent {agent} added; it may dispatch to: {', '.join(allow)}")
    return EXIT_OK


async def _agents_remove(run: Run) -> int:
    agent: str = run.args.agent
    async with run.connect() as q:
        removed = await q.remove_agent(agent)
    if not removed:
        raise UnknownAgent(agent, f"Unknown agent: {agent}; nothing was removed")
    run.emit({"agent": agent, "removed": True}, f"Agent {agent} removed")
    return EXIT_OK


# -- the embedded server -----------------------------------------------------


def add_server(commands: Commands) -> None:
    group = commands.group(
        "server",
        summary="the embedded Redis server",
        description=(
            "The Redis server agentq starts for itself when no Redis is given or configured.\n"
            "It lives in $AGENTQ_HOME (default ./.agentq) and keeps running between commands."
        ),
        examples=["agentq server status", "agentq server stop"],
    )
    group.add(
        "status",
        summary="whether the embedded server runs (exit 0) or not (exit 1)",
        description=(
            "Tell whether the embedded Redis server of $AGENTQ_HOME runs: exit 0 when it does,\n"
            "1 when not. With --json, {running, home, pid, socket, url}."
        ),
        examples=["agentq server status"],
        handler=_server_status,
    )
    group.add(
        "stop",
        summary="stop the embedded server (its data is kept)",
        description=(
            "Stop the embedded Redis server of $AGENTQ_HOME, saving its data first. The next\n"
            "command that needs it starts it again. With --json, {stopped, home}."
        ),
        examples=["agentq server stop"],
        handler=_server_stop,
    )


async def _server_status(run: Run) -> int:
    import asyncio

    from agentq import embedded

    home = embedded.home_dir(run.environ)
    server = await asyncio.to_thread(embedded.server_status, home)
    if server is None:
        run.emit({"running": False, "home": str(home), "pid": None, "socket": None, "url": None},
                 f"The embedded Redis server is not running (home {home})")
        return EXIT_FAILED
    run.emit(
        {"running": True, "home": str(home), "pid": server.pid, "socket": str(server.socket),
         "url": server.url},
        render.key_values([("running", "yes"), ("home", str(home)), ("pid", str(server.pid)),
                           ("socket", str(server.socket))]),
    )
    return EXIT_OK


async def _server_stop(run: Run) -> int:
    import asyncio

    from agentq import embedded

    home = embedded.home_dir(run.environ)
    stopped = await asyncio.to_thread(embedded.stop_server, home)
    text = (f"Stopped the embedded Redis server (home {home})" if stopped
            else f"The embedded Redis server was not running (home {home})")
    run.emit({"stopped": stopped, "home": str(home)}, text)
    return EXIT_OK


