"""Shards: how partitions are grouped for ownership, and who should own each.

A partition's background work is owned by shard, not by agent, so that the
leases a process holds are a fixed, small number however many agents there
are. An agent's shard is a stable hash of its id. Who should own a shard is
decided by rendezvous hashing over the processes that take leases: each
process computes the same answer from the same census, and when a process
comes or goes only the shards it wins or held change hands.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Collection
from typing import Final

SHARDS: Final = 64


def shard_of(agent: str) -> int:
    """The shard of ``agent``'s partition (stable across processes and versions)."""
    return zlib.crc32(agent.encode()) % SHARDS


def _score(shard: int, process: str) -> bytes:
    return hashlib.blake2b(f"{shard}/{process}".encode(), digest_size=8).digest()


def owner_of(shard: int, processes: Collection[str]) -> str | None:
    """The process that should own ``shard`` among ``processes`` (None: none)."""
    if not processes:
        return None
    return max(processes, key=lambda process: (_score(shard, process), process))


def share_of(process: str, processes: Collection[str]) -> set[int]:
    """The shards ``process`` should own among ``processes`` (itself included)."""
    everyone = set(processes) | {process}
    return {shard for shard in range(SHARDS) if owner_of(shard, everyone) == process}
