"""Job ids: ULIDs in Crockford's base32, strictly increasing within a process."""

from __future__ import annotations

import time

from hypothesis import given
from hypothesis import strategies as st

from agentq.eventlog import ids
from agentq.schemas.job import JOB_ID_RE, agent_of_job

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def reference_encode(value: int, length: int) -> str:
    """Crockford base32 by repeated division, most significant character first."""
    out = ""
    for _ in range(length):
        value, digit = divmod(value, 32)
        out = CROCKFORD[digit] + out
    return out


def decode(text: str) -> int:
    value = 0
    for char in text:
        value = value * 32 + CROCKFORD.index(char)
    return value


@given(st.integers(min_value=0, max_value=2**80 - 1))
def test_random_part_is_crockford_base32(value: int) -> None:
    assert ids._encode_random(value) == reference_encode(value, 16)


def test_ids_increase_strictly_and_carry_their_time() -> None:
    before = time.time_ns() // 1_000_000
    made = [ids.new_job_id("agent-1") for _ in range(5000)]
    after = time.time_ns() // 1_000_000
    ulids = [m[2:28] for m in made]
    assert ulids == sorted(ulids) and len(set(ulids)) == len(ulids)
    for job_id in made:
        assert JOB_ID_RE.match(job_id) and agent_of_job(job_id) == "agent-1"
    assert before <= decode(ulids[0][:10]) <= decode(ulids[-1][:10]) <= after


def test_increment_carries_into_the_higher_characters() -> None:
    # The random part's low bits all set: the next id in the same millisecond carries.
    assert ids._encode_random(0b11111 + 1) == reference_encode(32, 16)
    assert ids._encode_random(2**80 - 2)[-1] == "Y"


def test_job_id_time_reads_the_ulid_time_and_refuses_what_is_no_job_id() -> None:
    before = time.time_ns() // 1_000_000
    made = ids.job_id_time_ms(ids.new_job_id("a"))
    assert made is not None and before <= made <= time.time_ns() // 1_000_000
    assert ids.job_id_time_ms("j_0000000000") == 0
    assert ids.job_id_time_ms("j_ZZZZZZZZZZ.a") == 32**10 - 1
    # Letters Crockford leaves out, signs, spaces, underscores and non-ASCII digits
    # (each of which int() would otherwise read) are no job id.
    for bad in ("j_012345678I", "j_012345678L", "j_012345678O", "j_012345678U",
                "j_+123456789", "j_ 123456789", "j_0_23456789", "j_\u0663123456789",
                "j_012345678", "x_0123456789", "j_01234567a9"):
        assert ids.job_id_time_ms(bad) is None, bad


@given(st.integers(min_value=0, max_value=32**10 - 1))
def test_job_id_time_is_the_encoded_time(ms: int) -> None:
    assert ids.job_id_time_ms(f"j_{reference_encode(ms, 10)}{'0' * 16}.a") == ms
