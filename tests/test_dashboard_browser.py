"""The dashboard in a real browser: Debian's chromium (``.ci/run`` installs it)
driven by Playwright, against ``agentq dashboard`` and ``agentq worker`` running
as processes on a key prefix of their own, with jobs dispatched by the CLI.

Log in; a job dispatched from the CLI appears on the open jobs page; its page
has its timeline and graph; a dead letter is retried from the page and the job
page shows it complete; a stranger's token sees none of it.

With ``AGENTQ_SCREENSHOTS=1`` each page is saved under docs/images/ (the
README shows them).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import agentq
from agentq.schemas.config import Config

sync_api = pytest.importorskip("playwright.sync_api")

REPO = Path(__file__).resolve().parent.parent
IMAGES = REPO / "docs" / "images"
READY = "agentq: dashboard at "
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHOTS = os.environ.get("AGENTQ_SCREENSHOTS") == "1"
# The worker's handler: the task "flaky" fails its first attempt, anything else
# completes with its task echoed.
HANDLER = ('read -r task; if [ "$task" = flaky ] && [ "$AGENTQ_ATTEMPT" = 1 ]; then '
           'echo "the first attempt fails" >&2; exit 1; fi; echo "done: $task"')

if CHROMIUM is None:
    if os.environ.get("CI"):
        raise RuntimeError("chromium is not installed: .ci/run installs it with apt")
    pytest.skip("chromium is not installed (apt-get install -y chromium)",
                allow_module_level=True)


@dataclass
class Deployment:
    url: str  # the dashboard's
    redis_url: str
    config: Config
    env: dict[str, str]
    operator: str  # a token of the system agent main
    stranger: str  # a token of agent c

    def cli(self, *args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "agentq.cli", "--redis", self.redis_url,
                               *args], env=self.env, cwd=REPO, capture_output=True, text=True,
                              timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def dispatch(self, *args: str) -> str:
        """``agentq dispatch ARGS --json``: the new job's id."""
        return str(json.loads(self.cli("dispatch", *args, "--json"))["jobId"])


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as err:
        return subprocess.Popen([sys.executable, "-m", "agentq.cli", *args],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err, env=env, cwd=REPO)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def deployment(redis_url: str) -> Iterator[Deployment]:
    from conftest import _delete_prefix

    prefix = f"t{uuid.uuid4().hex[:10]}"
    config = Config.model_validate({"keyPrefix": prefix})
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTQ_")}
    env.update(AGENTQ_KEY_PREFIX=prefix, AGENTQ_RATE_LIMIT__DISPATCHES_PER_MINUTE="0",
               AGENTQ_RATE_LIMIT__MAX_QUEUE_DEPTH="0", AGENTQ_JOBS__BACKOFF_BASE_SECONDS="0")

    async def prepare() -> tuple[str, str]:
        async with agentq.connect(redis_url, config) as q:
            for agent in ("a", "b", "c"):
                await q.add_agent(agent)
            return (await q.tokens.add("main")).token, (await q.tokens.add("c")).token

    operator, stranger = asyncio.run(prepare())
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "dashboard"
        try:
            procs.append(_start(["--redis", redis_url, "dashboard", "--port", "0"], env, log))
            procs.append(_start(["--redis", redis_url, "worker", "b", "--exec", HANDLER],
                                env, Path(tmp) / "worker"))
            deadline = time.monotonic() + 30
            while READY not in (text := log.read_text(errors="replace")):
                assert procs[0].poll() is None and time.monotonic() < deadline, text
                time.sleep(0.05)
            url = text.split(READY, 1)[1].split()[0].rstrip("/")
            yield Deployment(url, redis_url, config, env, operator, stranger)
        finally:
            for proc in procs:
                _stop(proc)
            if os.environ.get("REDIS_URL"):
                _delete_prefix(redis_url, prefix)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield launched
        launched.close()


def _logged_in(browser: object, deployment: Deployment, token: str) -> object:
    context = browser.new_context(viewport={"width": 1280, "height": 800})  # type: ignore[attr-defined]
    page = context.new_page()
    page.goto(f"{deployment.url}/jobs")
    assert "/login" in page.url  # asked for a token first
    page.fill("input[name=token]", token)
    page.click("button[type=submit]")
    page.wait_for_url(f"{deployment.url}/jobs")
    return page


def _shot(page: object, name: str) -> None:
    if SHOTS:
        IMAGES.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(IMAGES / f"dashboard-{name}.png"), full_page=True)  # type: ignore[attr-defined]


def test_the_dashboard_in_a_browser(deployment: Deployment, browser: object) -> None:
    expect = sync_api.expect
    page = _logged_in(browser, deployment, deployment.operator)
    expect(page.locator("#live-status")).to_have_text("●")  # the live stream is open
    # A job dispatched from the CLI appears on the open page, without a reload.
    first = deployment.dispatch("b", "summarise the report", "--label", "summary")
    dependency = deployment.dispatch("a", "collect sources", "--label", "sources")
    job_id = deployment.dispatch("a", "write the article", "--label", "article",
                                 "--depends-on", first, "--depends-on", dependency)
    shown = time.monotonic()
    expect(page.locator(f'tr[data-job-id="{job_id}"]')).to_be_visible(timeout=5000)
    assert time.monotonic() - shown < 5
    _shot(page, "jobs")

    # Its page: the timeline with times and actors, and the graph of its dependencies.
    page.click(f'tr[data-job-id="{job_id}"] a')
    page.wait_for_url(f"{deployment.url}/jobs/{job_id}")
    expect(page.locator("ol.timeline li").first).to_contain_text("JobDispatched")
    expect(page.locator("ol.timeline li").first).to_contain_text("by main")
    graph = page.locator("svg.job-graph")
    expect(graph).to_be_visible()
    expect(graph.locator(f'[data-job-id="{dependency}"]')).to_be_visible()
    expect(graph.locator(f'[data-job-id="{job_id}"]')).to_be_visible()
    _shot(page, "job")

    # A dead letter, retried from the page: its page then shows it completed, live.
    flaky = deployment.dispatch("b", "flaky", "--max-attempts", "1")
    page.goto(f"{deployment.url}/dead-letters")
    row = page.locator(f'tr[data-job-id="{flaky}"]')
    expect(row).to_be_visible(timeout=15000)
    expect(row).to_contain_text("the first attempt fails")
    _shot(page, "dead-letters")
    row.locator("button.retry").click()
    expect(page.locator(".notice")).to_have_text("Re-queued.")
    page.goto(f"{deployment.url}/jobs/{flaky}")
    expect(page.locator(".job-head .state")).to_have_text("completed", timeout=15000)
    expect(page.locator("pre.result")).to_have_text("done: flaky")

    page.goto(f"{deployment.url}/")
    expect(page.locator('tr[data-agent="b"] .status')).to_have_text("idle")
    _shot(page, "agents")
    pending = deployment.dispatch("a", "deploy to production", "--label", "deploy",
                                  "--requires-approval")
    page.goto(f"{deployment.url}/approvals")
    expect(page.locator(f'tr[data-job-id="{pending}"] button.approve')).to_be_visible()
    _shot(page, "approvals")
    page.locator(f'tr[data-job-id="{pending}"] button.approve').click()
    expect(page.locator(".notice")).to_have_text("Approved.")
    expect(page.locator(f'tr[data-job-id="{pending}"]')).to_have_count(0)

    # A stranger's token: the operator's jobs are neither listed nor shown.
    other = _logged_in(browser, deployment, deployment.stranger)
    expect(other.locator("table.jobs tbody")).to_contain_text("No jobs.")
    other.goto(f"{deployment.url}/jobs/{job_id}")
    expect(other.locator(".error")).to_contain_text(
        "you can only view jobs you dispatched or that target you")
    other.goto(f"{deployment.url}/dead-letters")
    expect(other.locator("table.jobs tbody")).to_contain_text("No jobs.")
    assert other.locator("button.retry").count() == 0
