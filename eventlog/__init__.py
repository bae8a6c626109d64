"""The write side: the key layout, the Lua transitions and their wrappers, reading
and replaying the log, and the fold that rebuilds state from it."""

from eventlog.fold import rebuild
from eventlog.keys import Keys, Partition
from eventlog.reader import RawEvent, job_history, read_partition, replay
from eventlog.scripts import Scripts

__all__ = ["Keys", "Partition", "RawEvent", "Scripts", "job_history", "read_partition",
           "rebuild", "replay"]
