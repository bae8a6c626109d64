"""The write side: the key layout, the Lua transitions and their wrappers, reading
and replaying the log, and the fold that derives state records from it."""

from agentq.eventlog.fold import records_from
from agentq.eventlog.keys import Keys, Partition
from agentq.eventlog.reader import RawEvent, job_history, read_partition, replay
from agentq.eventlog.scripts import Scripts

__all__ = ["Keys", "Partition", "RawEvent", "Scripts", "job_history", "read_partition",
           "records_from", "replay"]
