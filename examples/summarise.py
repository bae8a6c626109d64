"""A handler for ``agentq worker --exec``: any program that reads the task on
standard input and prints the result on standard output.

    agentq worker researcher --exec 'python examples/summarise.py'

Lines ``::progress <0-100> [message]`` on standard error report progress (they
show in ``agentq status`` and ``agentq wait``); any other standard error is kept
as the job's error if the program exits non-zero, which fails the attempt. The
job's id, target, dispatcher and attempt are in the environment
(``AGENTQ_JOB_ID``, ``AGENTQ_TARGET``, ``AGENTQ_DISPATCHED_BY``,
``AGENTQ_ATTEMPT``), and its whole view as JSON in the file named by
``AGENTQ_JOB_FILE`` (and in ``AGENTQ_JOB_JSON`` when under 64 KiB).
"""

import os
import sys
import time


def progress(percent: int, message: str) -> None:
    print(f"::progress {percent} {message}", file=sys.stderr, flush=True)


def main() -> None:
    task = sys.stdin.read().strip()
    if not task:
        sys.exit("nothing to summarise: the task is empty")
    progress(10, "reading the task")
    words = task.split()
    time.sleep(0.2)  # stands for the real work (a model call, say)
    progress(60, f"{len(words)} words read")
    time.sleep(0.2)
    summary = " ".join(words[:12]) + (" …" if len(words) > 12 else "")
    progress(100, "done")
    print(f"Summary of {os.environ.get('AGENTQ_JOB_ID', 'the task')}: {summary}")


if __name__ == "__main__":
    main()
