"""A remote agent reaching agentq over MCP (Streamable HTTP) with the official
Python SDK: dispatch a job, then wait for it, printing its progress.

    agentq tokens add planner                  # once, on the agentq side
    agentq mcp --http 8765                     # the server (put TLS in front of it)

    export AGENTQ_TOKEN=aqt....                # the token `tokens add` printed
    export AGENTQ_MCP_URL=http://127.0.0.1:8765/mcp
    python examples/mcp_http_client.py researcher "summarise the report" --wait 120
"""

import argparse
import asyncio
import json
import os

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client


async def main(target: str, task: str, wait: float) -> None:
    url = os.environ.get("AGENTQ_MCP_URL", "http://127.0.0.1:8765/mcp")
    headers = {"Authorization": f"Bearer {os.environ['AGENTQ_TOKEN']}"}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=60)) as http,
        Client(streamable_http_client(url, http_client=http)) as client,
    ):
        # The instructions say who this token acts as and whom it may dispatch to.
        print((client.instructions or "").split(". ")[1])

        dispatched = await client.call_tool("queue_dispatch", {"target": target, "task": task})
        job = json.loads(dispatched.content[0].text)
        if dispatched.is_error:
            raise SystemExit(f"refused: {job['error']['message']}")
        print(f"dispatched {job['jobId']} ({job['state']})")

        async def progress(done: float, total: float | None, message: str | None) -> None:
            print(f"  {message}")  # at least every 10 s while the job runs

        waited = await client.call_tool(
            "queue_wait", {"jobId": job["jobId"], "timeoutSeconds": wait},
            progress_callback=progress)
        view = json.loads(waited.content[0].text)
        if view["timedOut"]:
            print(f"still {view['state']} after {wait:g} s")
        else:
            print(f"{view['state']}: {view['result'] or view['error']}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("target")
    parser.add_argument("task")
    parser.add_argument("--wait", type=float, default=60, help="seconds (1 to 600)")
    args = parser.parse_args()
    asyncio.run(main(args.target, args.task, args.wait))
