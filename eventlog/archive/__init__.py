"""The archive: where events go before they leave Redis.

Per partition, segment files of events (JSON Lines as ``replay`` prints them,
gzip) and a manifest listing them with a SHA-256 hash chain and a job index; on
a local folder or an object store (``s3://``), through fsspec. The archiving
pass (reading the log, trimming it) and the reads that merge archive and log
are built on this API; this package knows nothing of Redis. docs/architecture.md
holds the design.
"""

from agentq.eventlog.archive._archive import Archive, open_archive
from agentq.eventlog.archive._errors import ArchiveError
from agentq.eventlog.archive._manifest import Segment
from agentq.eventlog.archive._segments import ArchivedLine, EventKey, event_key

__all__ = ["Archive", "ArchiveError", "ArchivedLine", "EventKey", "Segment", "event_key",
           "open_archive"]
