"""Events set aside on disk while a log is read, read back job by job.

``audit verify`` folds at most so many jobs at once; the events of the others
(a backlog: jobs dispatched long before they ran) are written here as the log
is read, so that the log is read once and no job is looked up again in Redis.
Each event goes to one of :data:`WAYS` files by its job id (CRC-32), in log order; a
file is read back whole, its events grouped by job, each job's in log order. A
file too long to read back whole (past :data:`READ_WHOLE` events) is first
split the same way, by a different hash, so what is held stays bounded
however long the log (a file read back holds about 300 bytes per event). The
files are temporary (``TMPDIR``): about 220 bytes of disk per event set aside.
"""

from __future__ import annotations

import tempfile
import zlib
from collections.abc import Iterator
from typing import IO, Final

from agentq.eventlog.reader import RawEvent

WAYS: Final = 64
READ_WHOLE: Final = 100_000
# Split this many times at most: past that, what is left is one job's own
# events (or few jobs'), which no hash splits.
_LEVELS: Final = 3


class Spill:
    """Events of jobs set aside: :meth:`add` each in log order, then :meth:`jobs`."""

    def __init__(self, agent: str, level: int = 0) -> None:
        self.agent, self.level = agent, level
        self.files: list[IO[bytes] | None] = [None] * WAYS
        self.counts = [0] * WAYS

    def __enter__(self) -> Spill:
        return self

    def __exit__(self, *_: object) -> None:
        for file in self.files:
            if file is not None:
                file.close()

    @property
    def events(self) -> int:
        """How many events were set aside."""
        return sum(self.counts)

    def add(self, event: RawEvent) -> None:
        self.add_row(event.job_id, event.row())

    def add_row(self, job_id: str, row: bytes) -> None:
        # Not hash(): the same on every run, so a report comes in the same order.
        way = zlib.crc32(job_id.encode(), self.level) % WAYS
        file = self.files[way]
        if file is None:
            # Closed once read back, or by __exit__.
            file = self.files[way] = tempfile.TemporaryFile("w+b")  # noqa: SIM115
        file.write(b"%s\t%s\n" % (job_id.encode(), row))
        self.counts[way] += 1

    def jobs(self) -> Iterator[list[RawEvent]]:
        """Each job's events, in log order, a file's jobs in the order first met."""
        for way, file in enumerate(self.files):
            if file is None:
                continue
            file.seek(0)
            if self.counts[way] > READ_WHOLE and self.level < _LEVELS:
                with Spill(self.agent, self.level + 1) as finer:
                    for line in file:
                        job_id, row = line.rstrip(b"\n").split(b"\t", 1)
                        finer.add_row(job_id.decode(), row)
                    yield from finer.jobs()
            else:
                grouped: dict[bytes, list[bytes]] = {}
                for line in file:
                    job_id, row = line.rstrip(b"\n").split(b"\t", 1)
                    grouped.setdefault(job_id, []).append(row)
                for rows in grouped.values():
                    yield [RawEvent.of_row(self.agent, row) for row in rows]
                del grouped
            file.close()
            self.files[way] = None
