"""Job ids: ``j_`` + a ULID + ``.`` + the target agent.

The ULID makes ids sortable by creation time; within one process ids made in
the same millisecond still sort in the order they were made. The agent suffix
names the job's partition, so no global lookup is needed to find a job.
"""

from __future__ import annotations

import os
import threading
import time

# Crockford's base32, as ULIDs use it; the standard alphabet maps onto it in order.
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# Every 10-bit value as its two characters: 80 bits are eight look-ups.
_PAIRS = [high + low for high in _CROCKFORD for low in _CROCKFORD]
_lock = threading.Lock()
_last_ms = 0
_last_rand = 0
_last_time_part = ""


def _encode(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def _encode_random(value: int) -> str:
    """80 bits as 16 Crockford characters."""
    p = _PAIRS
    return (p[value >> 70] + p[(value >> 60) & 1023] + p[(value >> 50) & 1023]
            + p[(value >> 40) & 1023] + p[(value >> 30) & 1023] + p[(value >> 20) & 1023]
            + p[(value >> 10) & 1023] + p[value & 1023])


def new_ulid() -> str:
    """A 26-character ULID, strictly increasing within this process."""
    global _last_ms, _last_rand, _last_time_part
    with _lock:
        now = time.time_ns() // 1_000_000
        if now <= _last_ms:
            _last_rand += 1
        else:
            _last_ms = now
            _last_rand = int.from_bytes(os.urandom(10), "big") >> 1
            _last_time_part = _encode(now, 10)
        return _last_time_part + _encode_random(_last_rand)


def new_job_id(target: str) -> str:
    return f"j_{new_ulid()}.{target}"


def job_id_time_ms(job_id: str) -> int | None:
    """When a job id was made (ms, by the dispatching host's clock), read back
    from its ULID; None when it is no job id."""
    time_part = job_id[2:12]
    if not job_id.startswith("j_") or len(time_part) < 10 or not time_part.isascii():
        return None
    try:
        return int(time_part.translate(_AS_BASE32), 32)
    except ValueError:
        return None


# Crockford's digits as int(..., 32) reads them (0-9, then a-v); every other ASCII
# character as one it refuses.
_AS_BASE32 = str.maketrans({chr(code): "!" for code in range(128)}
                           | {char: "0123456789abcdefghijklmnopqrstuv"[value]
                              for value, char in enumerate(_CROCKFORD)})
