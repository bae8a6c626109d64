"""The dashboard's ASGI app (Starlette): server-rendered pages, a few forms, and
server-sent events that tell open pages to reload their content.

Every request but the login page's is made by a logged-in session
(:mod:`agentq.dashboard._sessions`), whose token names the agent it acts for;
each page reads through the client with that agent as the caller, so it shows
what the tools would show that agent, and each action is the client's call with
that caller, refused as the tools refuse it. Buttons are drawn only where the
call would be allowed: retry for system agents, approve and reject for
approvers (``auth.approvers``; by default the system agents); other agents
see read-only pages.

Actions are ``POST`` forms carrying the session's CSRF token; the session
cookie is ``SameSite=Strict`` and ``HttpOnly``, and a ``POST`` whose ``Origin``
is another site's is refused before anything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from redis.exceptions import RedisError
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from agentq import _access as access
from agentq.client import Client
from agentq.dashboard import pages
from agentq.dashboard._feed import Feed, Overflow
from agentq.dashboard._sessions import COOKIE, Session, Sessions, Verifier
from agentq.eventlog import reader
from agentq.schemas._base import micros_to_iso
from agentq.schemas.errors import AgentqError, InvalidInput, Unavailable
from agentq.schemas.job import STATES, agent_of_job

__all__ = ["Dashboard", "dashboard_app"]

_HERE = Path(__file__).parent
_STATUS = {"invalid_input": 400, "not_found": 404, "unknown_agent": 404, "unauthorized": 403,
           "forbidden": 403, "rate_limited": 429, "queue_full": 429, "invalid_state": 409,
           "unavailable": 503}
# How often a live stream checks that its token still stands (and pings the browser).
_RECHECK_SECONDS = 15.0
# What an action's outcome says on the page it returns to (a fixed set: nothing of
# the request is written back into the page).
NOTICES = {"retried": "Re-queued.", "approved": "Approved.", "rejected": "Rejected."}


class Dashboard:
    """The pages and actions of one deployment, for the sessions of this process."""

    def __init__(self, client: Client, verifier: Verifier | None = None, *,
                 live: bool = True) -> None:
        """``verifier`` checks tokens (default: the deployment's token store);
        ``live`` runs the feed of server-sent events."""
        self.client = client
        self.verifier: Verifier = verifier if verifier is not None else client.tokens
        self.sessions = Sessions()
        self.feed: Feed | None = None
        self._live = live
        self.templates = Environment(
            loader=FileSystemLoader(_HERE / "templates"),
            autoescape=select_autoescape(default=True), enable_async=False,
            trim_blocks=True, lstrip_blocks=True)
        self.templates.globals.update(states=STATES,
                                      counts=pages.COUNTS, notices=NOTICES)
        self.templates.filters["when"] = _when

    # -- lifecycle -----------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The live feed, while the app serves."""
        if not self._live:
            yield
            return
        stop = asyncio.Event()
        self.feed = Feed(self.client.redis, self.client.open_blocking(), self.client.keys)
        task = asyncio.create_task(self.feed.run(stop))
        try:
            yield
        finally:
            stop.set()
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(task, 5)

    # -- who is asking -------------------------------------------------------

    async def _who(self, request: Request) -> tuple[str, Session] | None:
        session = self.sessions.get(request.cookies.get(COOKIE))
        if session is None:
            return None
        agent = await self._verify(session.token)
        if agent is None:  # revoked since
            self.sessions.close(request.cookies.get(COOKIE))
            return None
        return agent, session

    async def _verify(self, token: str) -> str | None:
        """The token's agent; Unavailable when it cannot be checked now."""
        try:
            return await self.verifier.verify(token)
        except (RedisError, OSError) as exc:
            raise Unavailable(f"agentq cannot check the token now: Redis is unavailable "
                              f"({exc}); check that it is running") from exc

    def _render(self, request: Request, name: str, status: int = 200,
                **context: Any) -> Response:
        template = self.templates.get_template(name)
        context.setdefault("path", request.url.path)
        context.setdefault("query", request.url.query)
        if request.query_params.get("partial") == "1" and "content" in template.blocks:
            ctx = template.new_context(context)
            return HTMLResponse("".join(template.blocks["content"](ctx)), status)
        return HTMLResponse(template.render(context), status)

    def _error(self, request: Request, exc: AgentqError, **context: Any) -> Response:
        return self._render(request, "error.html", _STATUS.get(exc.code, 400),
                            error=exc, **context)

    def page(self, name: str, build: Callable[[Request, str], Awaitable[dict[str, Any]]],
             ) -> Callable[[Request], Awaitable[Response]]:
        """A GET endpoint: the login page when nobody is logged in, else ``name``
        rendered with what ``build`` read for the caller (its refusal as an error page)."""

        async def endpoint(request: Request) -> Response:
            try:
                who = await self._who(request)
            except AgentqError as exc:
                return self._error(request, exc)
            if who is None:
                if request.query_params.get("partial") == "1":
                    return Response("login again", 401)
                return RedirectResponse(f"/login?next={_local(request.url.path)}", 303)
            agent, session = who
            common: dict[str, Any] = {"agent": agent, "csrf": session.csrf,
                      "system": self.client.config.is_system(agent),
                      "approver": self.client.config.is_approver(agent),
                      "notice": NOTICES.get(request.query_params.get("notice", ""))}
            try:
                data = await build(request, agent)
            except AgentqError as exc:
                return self._error(request, exc, **common)
            return self._render(request, name, **common, **data)

        return endpoint

    # -- pages ---------------------------------------------------------------

    async def agents(self, request: Request, who: str) -> dict[str, Any]:
        return {"activity": await pages.agents_page(self.client, who), "live": "all",
                "title": "Agents"}

    async def _listing(self, request: Request, who: str, path: str, states: Sequence[str],
                       title: str) -> dict[str, Any]:
        params = request.query_params
        query = pages.JobsQuery.of(params, states)
        listing = await pages.jobs_page(self.client, who, query)
        return {"listing": listing, "filters": query, "title": title, "live": "all",
                "next_href": query.href(path, listing.next_cursor)
                if listing.next_cursor else None,
                "first_href": query.href(path, None) if query.cursor else None}

    async def jobs(self, request: Request, who: str) -> dict[str, Any]:
        return await self._listing(request, who, "/jobs",
                                   request.query_params.getlist("state"), "Jobs")

    async def dead_letters(self, request: Request, who: str) -> dict[str, Any]:
        return await self._listing(request, who, "/dead-letters", ["failed"], "Dead letters")

    async def approvals(self, request: Request, who: str) -> dict[str, Any]:
        return await self._listing(request, who, "/approvals", ["pending_approval"],
                                   "Pending approvals")

    async def job(self, request: Request, who: str) -> dict[str, Any]:
        found = await pages.job_page(self.client, who, request.path_params["job_id"])
        # The graph's markup is built with every text escaped (_graph.py).
        return {"job": found, "view": found.view, "graph": Markup(found.graph),
                "live": " ".join(found.related), "title": found.view.job_id}

    # -- login ---------------------------------------------------------------

    async def login(self, request: Request) -> Response:
        next_path = _local(request.query_params.get("next", "/"))
        if request.method == "GET":
            return self._render(request, "login.html", next=next_path, title="Log in")
        if not _same_origin(request):
            return Response("cross-site request refused", 403)
        form = await request.form()
        token = str(form.get("token") or "").strip()
        next_path = _local(str(form.get("next") or "/"))
        try:
            agent = await self._verify(token) if token else None
        except AgentqError as exc:
            return self._error(request, exc)
        if agent is None:
            return self._render(
                request, "login.html", 401, next=next_path, title="Log in",
                failed="That token is not known (or was revoked). Ask an operator for one: "
                       "agentq tokens add AGENT")
        session_id, _ = self.sessions.open(token)
        response = RedirectResponse(next_path, 303)
        response.set_cookie(COOKIE, session_id, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https", path="/")
        return response

    async def logout(self, request: Request) -> Response:
        if not _same_origin(request):
            return Response("cross-site request refused", 403)
        session = self.sessions.get(request.cookies.get(COOKIE))
        form = await request.form()
        if session is not None and session.csrf_matches(_text(form.get("csrf"))):
            self.sessions.close(request.cookies.get(COOKIE))
        response = RedirectResponse("/login", 303)
        response.delete_cookie(COOKIE, path="/")
        return response

    # -- actions -------------------------------------------------------------

    async def act(self, request: Request) -> Response:
        """``POST /jobs/{job_id}/{retry|approve|reject}``: the client's call as the
        session's agent; back to where the form was, saying what happened."""
        if not _same_origin(request):
            return Response("cross-site request refused", 403)
        try:
            who = await self._who(request)
        except AgentqError as exc:
            return self._error(request, exc)
        if who is None:
            return RedirectResponse("/login", 303)
        agent, session = who
        form = await request.form()
        if not session.csrf_matches(_text(form.get("csrf"))):
            return Response("the form is stale or forged (CSRF token mismatch): reload the "
                            "page and try again", 403)
        job_id, action = request.path_params["job_id"], request.path_params["action"]
        text = _text(form.get("text")) or None
        try:
            if action == "retry":
                await self.client.retry(job_id, caller=agent)
            elif action == "approve":
                await self.client.approve(job_id, caller=agent, note=text)
            elif action == "reject":
                await self.client.reject(job_id, caller=agent, reason=text)
            else:
                raise InvalidInput(f"Unknown action {action!r}", path="action")
        except AgentqError as exc:
            return self._error(request, exc, agent=agent, csrf=session.csrf,
                               system=self.client.config.is_system(agent))
        back = _local(_text(form.get("next")) or f"/jobs/{job_id}")
        notice = {"retry": "retried", "approve": "approved", "reject": "rejected"}[action]
        joiner = "&" if "?" in back else "?"
        return RedirectResponse(f"{back}{joiner}notice={notice}", 303)

    # -- live ----------------------------------------------------------------

    async def events(self, request: Request) -> Response:
        """Server-sent events: each event of the log the session's agent may see,
        as ``{eventId, type, jobId, agent, at, actor}`` (never its data); a
        ``reload`` event when the page fell too far behind."""
        try:
            who = await self._who(request)
        except AgentqError as exc:  # the browser's EventSource tries again by itself
            return Response(exc.message, _STATUS.get(exc.code, 503))
        if who is None:
            return Response("log in first", 401)
        if self.feed is None:
            return Response("live updates are off in this dashboard", 404)
        agent = who[0]
        system = self.client.config.is_system(agent)
        shown = None if system else access.EventFilter(agent, self._specs)
        feed, token = self.feed, who[1].token

        async def stream() -> AsyncIterator[dict[str, str]]:
            queue = feed.subscribe()
            checked = time.monotonic()
            try:
                yield {"event": "ready", "data": "{}"}
                while True:
                    try:
                        item = await asyncio.wait_for(queue.get(), _RECHECK_SECONDS)
                    except TimeoutError:
                        item = None
                    if time.monotonic() - checked >= _RECHECK_SECONDS:
                        with contextlib.suppress(AgentqError):  # Redis away: ask later
                            if await self._verify(token) is None:
                                yield {"event": "logout", "data": "{}"}
                                return
                            checked = time.monotonic()
                    if item is None:
                        continue
                    if isinstance(item, Overflow):
                        yield {"event": "reload", "data": "{}"}
                        continue
                    event = item if shown is None else await shown.shown(item)
                    if event is not None:
                        yield {"data": orjson.dumps({
                            "eventId": event.event_id, "type": event.type,
                            "jobId": event.job_id, "agent": event.agent,
                            "at": micros_to_iso(event.at), "actor": event.actor}).decode()}
            finally:
                feed.unsubscribe(queue)

        return EventSourceResponse(stream(), ping=_RECHECK_SECONDS,
                                   headers={"Cache-Control": "no-store"})

    async def _specs(self, job_ids: Sequence[str]) -> list[str | None]:
        return await reader.read_specs(self.client.redis, [
            (self.client.partition(agent_of_job(j) or "-"), j) for j in job_ids])


def dashboard_app(client: Client, verifier: Verifier | None = None, *,
                  live: bool = True) -> Starlette:
    """The ASGI app of the dashboard over an open ``client``."""
    board = Dashboard(client, verifier, live=live)
    routes = [
        Route("/", board.page("agents.html", board.agents)),
        Route("/jobs", board.page("jobs.html", board.jobs)),
        Route("/jobs/{job_id}", board.page("job.html", board.job)),
        Route("/jobs/{job_id}/{action}", board.act, methods=["POST"]),
        Route("/dead-letters", board.page("jobs.html", board.dead_letters)),
        Route("/approvals", board.page("jobs.html", board.approvals)),
        Route("/events", board.events),
        Route("/login", board.login, methods=["GET", "POST"]),
        Route("/logout", board.logout, methods=["POST"]),
        Mount("/static", StaticFiles(directory=_HERE / "static"), name="static"),
    ]

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with board.running():
            yield

    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.dashboard = board
    return app


def _local(path: str) -> str:
    """``path`` when it is a path of this site, else ``/``: a redirect never leaves it."""
    if not path.startswith("/") or path.startswith("//") or "\\" in path:
        return "/"
    return path


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _same_origin(request: Request) -> bool:
    """False when the browser says the request comes from another site."""
    if request.headers.get("sec-fetch-site") in ("cross-site", "same-site"):
        return False
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None
    return urlsplit(origin).netloc == request.headers.get("host")


def _when(iso: str | None) -> str:
    """An ISO time as shown: to the millisecond, without the date's ``T``."""
    return "" if not iso else iso.replace("T", " ").removesuffix("Z")
