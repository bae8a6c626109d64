"""The dashboard without a browser: each page and action through the ASGI app
(httpx's ASGI transport), as the logged-in token's agent, against the real
Redis; the live stream through a real uvicorn server on a loopback port.

What a page shows must be what the tools show that agent (``list`` paging
exactly, ``status``' refusal); actions need the session's CSRF token and a
same-site request, and only agents the client allows get their buttons."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from html import unescape
from typing import Any

import httpx2
import orjson
import uvicorn

import agentq
from agentq import Job
from agentq.dashboard import dashboard_app

ROW = re.compile(r'<tr data-job-id="(j_[^"]+)"')
NEXT = re.compile(r'<a href="([^"]+)" rel="next">')
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@asynccontextmanager
async def dashboard(q: agentq.Client, token: str | None = None
                    ) -> AsyncIterator[httpx2.AsyncClient]:
    """The app over ``q`` (no live feed), with a browser-like client logged in with
    ``token`` when given."""
    app = dashboard_app(q, live=False)
    async with app.router.lifespan_context(app), httpx2.AsyncClient(
            transport=httpx2.ASGITransport(app=app), base_url="http://dash.test") as http:
        if token is not None:
            answer = await http.post("/login", data={"token": token, "next": "/"})
            assert answer.status_code == 303, answer.text
        yield http


def rows(html: str) -> list[str]:
    return ROW.findall(html)


def csrf_of(html: str) -> str:
    found = CSRF.search(html)
    assert found is not None, "no form with a CSRF token on the page"
    return found.group(1)


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


@asynccontextmanager
async def worker(q: agentq.Client, agent: str, handler: Callable[[Job], Any]
                 ) -> AsyncIterator[None]:
    """``agent``'s worker in this process, hosting the background consumers (gates)."""
    runner = q.worker(agent, handler, concurrency=4)
    task = asyncio.create_task(runner.run())
    try:
        yield
    finally:
        runner.stop()
        await asyncio.wait_for(task, 15)


# -- login -----------------------------------------------------------------------


async def test_pages_ask_for_a_token_and_a_session_follows_it(q: agentq.Client) -> None:
    token = (await q.tokens.add("main")).token
    async with dashboard(q) as http:
        answer = await http.get("/jobs")
        assert answer.status_code == 303 and answer.headers["location"] == "/login?next=/jobs"
        assert (await http.get("/jobs?partial=1")).status_code == 401
        assert (await http.get("/events")).status_code == 401
        refused = await http.post("/login", data={"token": token[:-1], "next": "/"})
        assert refused.status_code == 401 and "agentq tokens add AGENT" in refused.text
        foreign = await http.post("/login", data={"token": token},
                                  headers={"Origin": "http://evil.example"})
        assert foreign.status_code == 403 and "agent_session" not in str(foreign.cookies)
        # A redirect never leaves the site, whatever `next` says.
        answer = await http.post("/login", data={"token": token, "next": "//evil.example/"})
        assert answer.status_code == 303 and answer.headers["location"] == "/"
        cookie = answer.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
        home = await http.get("/")
        assert home.status_code == 200
        for agent in ("a", "b", "c"):
            assert f'<tr data-agent="{agent}">' in home.text
        assert "main (system)" in home.text
        # A revoked token ends its sessions at their next request.
        await q.tokens.revoke(token)
        assert (await http.get("/")).headers["location"] == "/login?next=/"


# -- jobs ------------------------------------------------------------------------


async def test_the_jobs_page_filters_and_pages_exactly_as_list(q: agentq.Client) -> None:
    for i in range(3):
        await q.dispatch("a", f"for a {i}", label=f"a{i}")
    for i in range(2):
        await q.dispatch("b", f"for b {i}")
    await q.dispatch("a", "delayed one", delay_seconds=600)
    token = (await q.tokens.add("main")).token
    async with dashboard(q, token) as http:
        shown: list[str] = []
        href: str | None = "/jobs?limit=2"
        while href is not None:
            page = await http.get(unescape(href))
            assert page.status_code == 200
            shown += rows(page.text)
            found = NEXT.search(page.text)
            href = found.group(1) if found else None
        listed: list[str] = []
        cursor = None
        while True:
            out = await q.list(limit=2, cursor=cursor)
            listed += [job.job_id for job in out.jobs]
            if (cursor := out.next_cursor) is None:
                break
        assert shown == listed and len(shown) == 6
        only_b = await http.get("/jobs?agent=b")
        assert rows(only_b.text) == [j.job_id for j in (await q.list(agent="b")).jobs]
        states = await http.get("/jobs?agent=a&state=delayed&state=completed")
        assert rows(states.text) == [
            j.job_id for j in (await q.list(agent="a", state=["delayed", "completed"])).jobs]
        assert len(rows(states.text)) == 1
        # The filters given come back checked in the form, and paging keeps them.
        assert 'value="delayed" checked' in states.text
        # What list refuses, the page refuses, saying why.
        wrong = await http.get("/jobs?limit=500")
        assert wrong.status_code == 400 and "invalid_input" in wrong.text
        assert (await http.get("/jobs?cursor=nonsense")).status_code == 400
        # The partial answer is the live region alone.
        partial = await http.get("/jobs?agent=b&partial=1")
        assert "<html" not in partial.text and rows(partial.text) == rows(only_b.text)


async def test_a_job_page_has_its_result_timeline_and_graph(q: agentq.Client) -> None:
    main = await q.dispatch("b", "the main job", label="main")
    dep = await q.dispatch("a", "stays queued: a has no worker")
    child = await q.dispatch("c", "dispatched from inside main", parent_job_id=main.job_id)
    waiter = await q.dispatch("c", "waits for both", depends_on=[main.job_id, dep.job_id])
    async with worker(q, "b", lambda job: {"answer": 42, "task": job.task}):
        await q.wait(main.job_id, timeout=15)
        token = (await q.tokens.add("main")).token
        async with dashboard(q, token) as http:

            async def graph_has(job_id: str, other: str) -> bool:
                page = await http.get(f"/jobs/{job_id}")
                return f'data-job-id="{other}"' in page.text.split("<h2>Graph</h2>")[1]

            # The gates index the child and register the waiter: soon, not at once.
            await until(lambda: graph_has(main.job_id, child.job_id), "the child in the graph")
            await until(lambda: graph_has(dep.job_id, waiter.job_id), "the dependent")
            page = (await http.get(f"/jobs/{main.job_id}")).text
    assert "&#34;answer&#34;: 42" in page or "&quot;answer&quot;: 42" in page
    timeline = page.split('<ol class="timeline">')[1].split("</ol>")[0]
    types = re.findall(r'<span class="type">(\w+)</span>', timeline)
    assert types == [e.type for e in await q.history(main.job_id)]
    assert types[0] == "JobDispatched" and types[-1] == "JobCompleted"
    assert "by main" in timeline  # the actor of the dispatch
    assert "<svg" in page and 'class="node state-completed current"' in page
    waiting = (await http_page(q, token, f"/jobs/{waiter.job_id}"))
    svg = waiting.split("<svg")[1]
    for dependency in (main.job_id, dep.job_id):
        assert f'data-job-id="{dependency}"' in svg
    missing = await http_page(q, token, "/jobs/j_01JZZZZZZZZZZZZZZZZZZZZZZZ.a", status=404)
    assert "not_found" in missing


async def http_page(q: agentq.Client, token: str, path: str, status: int = 200) -> str:
    async with dashboard(q, token) as http:
        answer = await http.get(path)
    assert answer.status_code == status, answer.text
    return answer.text


# -- dead letters, actions, and who may see what ---------------------------------


async def test_dead_letters_retry_and_a_strangers_view(q: agentq.Client) -> None:
    def flaky(job: Job) -> str:
        if job.attempt == 1:
            raise RuntimeError("first attempt fails")
        return "second time lucky"

    async with worker(q, "b", flaky):
        failed = await q.dispatch("b", "fails once", max_attempts=1)
        view, _ = await q.wait(failed.job_id, timeout=15)
        assert view.state == "failed"
        own = await q.dispatch("a", "the stranger's own", caller="c")
        operator = (await q.tokens.add("main")).token
        stranger = (await q.tokens.add("c")).token
        async with dashboard(q, stranger) as http:
            assert rows((await http.get("/jobs")).text) == [own.job_id]
            assert rows((await http.get("/dead-letters")).text) == []
            hidden = await http.get(f"/jobs/{failed.job_id}")
            assert hidden.status_code == 403
            assert "you can only view jobs you dispatched or that target you" in hidden.text
            assert failed.job_id not in (await http.get("/")).text
            mine = await http.get(f"/jobs/{own.job_id}")
            assert mine.status_code == 200 and "Retry" not in mine.text
            forced = await http.post(f"/jobs/{failed.job_id}/retry",
                                     data={"csrf": csrf_of(mine.text)})
            assert forced.status_code == 403 and "requires a system agent" in forced.text
        async with dashboard(q, operator) as http:
            letters = await http.get("/dead-letters")
            assert rows(letters.text) == [failed.job_id]
            assert "first attempt fails" in letters.text and "Retry" in letters.text
            csrf = csrf_of(letters.text)
            for data, headers in (({}, {}), ({"csrf": "forged"}, {}),
                                  ({"csrf": csrf}, {"Origin": "http://evil.example"}),
                                  ({"csrf": csrf}, {"Sec-Fetch-Site": "cross-site"})):
                refused = await http.post(f"/jobs/{failed.job_id}/retry", data=data,
                                          headers=headers)
                assert refused.status_code == 403, (data, headers)
            assert (await q.status(failed.job_id)).state == "failed"
            done = await http.post(f"/jobs/{failed.job_id}/retry",
                                   data={"csrf": csrf, "next": "/dead-letters"})
            assert done.status_code == 303
            assert done.headers["location"] == "/dead-letters?notice=retried"
            view, _ = await q.wait(failed.job_id, timeout=15)
            assert view.state == "completed" and view.result == "second time lucky"
            again = await http.post(f"/jobs/{failed.job_id}/retry", data={"csrf": csrf})
            assert again.status_code == 409 and "not failed" in again.text
            assert rows((await http.get("/dead-letters?notice=retried")).text) == []


async def test_pending_approvals_are_approved_and_rejected_by_approvers(
        q: agentq.Client) -> None:
    first = await q.dispatch("a", "needs a yes", requires_approval=True)
    second = await q.dispatch("a", "needs a no", requires_approval=True)
    operator = (await q.tokens.add("main")).token
    stranger = (await q.tokens.add("c")).token
    async with dashboard(q, stranger) as http:
        page = await http.get("/approvals")
        assert page.status_code == 200 and rows(page.text) == []
        forced = await http.post(f"/jobs/{first.job_id}/approve",
                                 data={"csrf": csrf_of(page.text)})
        assert forced.status_code == 403
    async with dashboard(q, operator) as http:
        page = await http.get("/approvals")
        assert sorted(rows(page.text)) == sorted([first.job_id, second.job_id])
        assert "Approve" in page.text and "Reject" in page.text
        csrf = csrf_of(page.text)
        assert (await http.post(f"/jobs/{first.job_id}/approve",
                                data={"csrf": csrf, "text": "ok"})).status_code == 303
        assert (await http.post(f"/jobs/{second.job_id}/reject",
                                data={"csrf": csrf, "text": "no"})).status_code == 303
        assert rows((await http.get("/approvals")).text) == []
    assert (await q.status(first.job_id)).state == "queued"
    assert (await q.status(second.job_id)).state == "cancelled"
    types = [e.type for e in await q.history(first.job_id)]
    assert "JobApproved" in types


# -- live ------------------------------------------------------------------------


async def test_the_live_stream_carries_what_each_agent_may_see(q: agentq.Client) -> None:
    app = dashboard_app(q)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           lifespan="on"))
    serving = asyncio.create_task(server.serve())
    try:
        await until(lambda: asyncio.sleep(0, server.started), "the server to start")
        port = server.servers[0].sockets[0].getsockname()[1]
        base = f"http://127.0.0.1:{port}"
        heard: dict[str, list[dict[str, Any]]] = {"main": [], "c": []}
        ready = {agent: asyncio.Event() for agent in heard}

        async def listen(agent: str) -> None:
            token = (await q.tokens.add(agent)).token
            async with httpx2.AsyncClient(base_url=base, timeout=30) as http:
                assert (await http.post("/login", data={"token": token})).status_code == 303
                async with http.stream("GET", "/events") as stream:
                    assert stream.headers["content-type"].startswith("text/event-stream")
                    async for line in stream.aiter_lines():
                        if line.startswith("event: ready"):
                            ready[agent].set()
                        elif line.startswith("data: {\""):
                            heard[agent].append(orjson.loads(line[6:]))

        listeners = [asyncio.create_task(listen(agent)) for agent in heard]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in ready.values())), 15)
        await asyncio.wait_for(app.state.dashboard.feed.ready.wait(), 15)
        hidden = await q.dispatch("b", "the operator's")
        mine = await q.dispatch("a", "the stranger's", caller="c")
        sent = time.monotonic()

        async def heard_all() -> bool:
            ids = {agent: {e["jobId"] for e in events} for agent, events in heard.items()}
            return {hidden.job_id, mine.job_id} <= ids["main"] and mine.job_id in ids["c"]

        await until(heard_all, "both dispatches on the streams", timeout=10)
        assert time.monotonic() - sent < 2
        assert hidden.job_id not in {e["jobId"] for e in heard["c"]}
        event = next(e for e in heard["c"] if e["jobId"] == mine.job_id)
        assert set(event) == {"eventId", "type", "jobId", "agent", "at", "actor"}
        assert event["actor"] == "c" and event["agent"] == "a"
        for task in listeners:
            task.cancel()
        await asyncio.gather(*listeners, return_exceptions=True)
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 15)
