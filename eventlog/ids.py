"""Job ids: ``j_`` + a ULID + ``.`` + the target agent.

The ULID makes ids sortable by creation time; within one process ids made in
the same millisecond still sort in the order they were made. The agent suffix
names the job's partition, so no global lookup is needed to find a job.
"""

from __future__ import annotations

import os
import threading
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_lock = threading.Lock()
_last_ms = 0
_last_rand = 0


def _encode(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def new_ulid() -> str:
    """A 26-character ULID, strictly increasing within this process."""
    global _last_ms, _last_rand
    with _lock:
        now = time.time_ns() // 1_000_000
        if now <= _last_ms:
            now = _last_ms
            _last_rand += 1
        else:
            _last_ms = now
            _last_rand = int.from_bytes(os.urandom(10), "big") >> 1
        return _encode(now, 10) + _encode(_last_rand, 16)


def new_job_id(target: str) -> str:
    return f"j_{new_ulid()}.{target}"
