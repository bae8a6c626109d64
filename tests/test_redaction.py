"""Redaction of alert content: properties over arbitrary text."""

from __future__ import annotations

import re

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from agentq.consumers.redaction import REDACTED, AlertContent, alert_text, redact
from agentq.schemas.job import JobView

# The SPEC's "base64-looking run", written independently of the implementation.
BASE64_RUN = re.compile(r"[A-Za-z0-9+/_-]{40,}")
BASE64_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/-_"

base64_payloads = st.text(alphabet=BASE64_CHARS, min_size=0, max_size=300).map(
    lambda s: s + "=" * (len(s) % 3)
)
mime_types = st.one_of(
    st.just(""),
    st.from_regex(r"[a-z]{1,12}/[a-z0-9.+-]{1,20}", fullmatch=True),
)
mime_params = st.lists(st.from_regex(r"[a-z]{1,8}=[a-z0-9-]{1,10}", fullmatch=True), max_size=2)
# Text around the blobs: anything, including base64 characters, spaces and unicode.
surroundings = st.text(max_size=300)


@st.composite
def data_uris(draw: st.DrawFn) -> str:
    scheme = draw(st.sampled_from(["data:", "DATA:", "Data:"]))
    params = "".join(f";{p}" for p in draw(mime_params))
    return f"{scheme}{draw(mime_types)}{params};base64,{draw(base64_payloads)}"


@given(st.text(max_size=2000))
def test_output_never_exceeds_limit_and_ends_in_dots_exactly_when_cut(text: str) -> None:
    out = redact(text)
    assert len(out) <= 200
    full = redact(text, limit=1_000_000)
    if len(full) > 200:
        assert out.endswith("...")
        assert out == full[:197] + "..."
    else:
        assert out == full


@given(st.text(max_size=600), st.integers(min_value=3, max_value=300))
def test_any_limit_holds(text: str, limit: int) -> None:
    out = redact(text, limit)
    assert len(out) <= limit
    full = redact(text, limit=1_000_000)
    assert out == full or (out.endswith("...") and len(out) == limit)


@given(surroundings, st.text(alphabet=BASE64_CHARS, min_size=40, max_size=500), surroundings)
def test_no_base64_run_of_40_survives(before: str, blob: str, after: str) -> None:
    text = before + blob + after
    assert BASE64_RUN.search(redact(text)) is None
    assert BASE64_RUN.search(redact(text, limit=1_000_000)) is None


@given(st.text(alphabet=BASE64_CHARS + " .,:;=\n", max_size=1000))
def test_no_base64_run_survives_in_base64_heavy_text(text: str) -> None:
    assert BASE64_RUN.search(redact(text, limit=1_000_000)) is None


@given(surroundings, data_uris(), surroundings)
def test_data_uris_never_survive(before: str, uri: str, after: str) -> None:
    out = redact(before + uri + after, limit=1_000_000)
    header = uri[: uri.lower().index(";base64,") + len(";base64,")]
    assert header not in out
    assert ";base64," not in out.lower() or ";base64," in (before + after).lower()
    assert REDACTED in out


@given(data_uris())
def test_a_data_uri_alone_becomes_the_marker(uri: str) -> None:
    assert redact(uri) == REDACTED


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=200))
def test_short_clean_text_is_unchanged(text: str) -> None:
    assume(BASE64_RUN.search(text) is None)
    assume(";base64," not in text.lower())
    assert redact(text) == text


def test_examples() -> None:
    blob = "QUJD" * 20
    assert redact(f"see data:image/png;base64,{blob}== here") == f"see {REDACTED} here"
    assert redact(f"token {blob} end") == f"token {REDACTED} end"
    assert redact("x" * 39) == "x" * 39
    assert redact("a b " * 100) == ("a b " * 100)[:197] + "..."
    assert redact("short") == "short"
    with pytest.raises(ValueError):
        redact("anything", limit=2)


# -- alert text ------------------------------------------------------------

# Characters found in no label of the text nor in the job id used below.
secrets = st.text(alphabet="QXJKVW#~|", min_size=12, max_size=30)


def _view(task: str, error: str, origin: dict[str, str], session_key: str, meta: str) -> JobView:
    return JobView.model_validate(
        {
            "jobId": "j_01HZZZZZZZZZZZZZZZZZZZZZZZ.a",
            "target": "a",
            "dispatchedBy": "planner",
            "task": task,
            "state": "failed",
            "attempt": 2,
            "maxAttempts": 3,
            "error": error,
            "createdAt": "2024-01-01T00:00:00.000000Z",
            "sessionKey": session_key,
            "origin": origin,
            "metadata": {"note": meta},
        }
    )


@given(
    st.text(max_size=3000),
    st.text(max_size=3000),
    st.fixed_dictionaries({"channel": secrets, "accountId": secrets, "threadId": secrets}),
    secrets,
    secrets,
)
def test_alert_text_leaves_out_origin_session_key_and_metadata(
    task: str, error: str, origin: dict[str, str], session_key: str, meta: str
) -> None:
    for secret in [*origin.values(), session_key, meta]:
        assume(secret not in task and secret not in error)
    job = _view(task, error, origin, session_key, meta)
    text = alert_text(job)
    content = AlertContent.of_job(job)
    for secret in [*origin.values(), session_key, meta]:
        assert secret not in text
        assert all(secret not in str(value) for value in content.fields().values())
    assert content.task == redact(task)
    assert content.error == redact(error)
    assert BASE64_RUN.search(text) is None


def test_alert_text_lines() -> None:
    job = _view("summarise X", "boom", {"channel": "c"}, "sk", "m")
    assert alert_text(job, attempts_used=1).splitlines() == [
        "agentq: job failed",
        "Job: j_01HZZZZZZZZZZZZZZZZZZZZZZZ.a",
        "Agent: a",
        "Dispatched by: planner",
        "Attempts: 1/3",
        "Error: boom",
        "Task: summarise X",
    ]
