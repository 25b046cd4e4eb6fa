"""Pause points for the chaos harness, loaded by its workers (``--include``) and drain subprocesses.

The harness arms a point by creating ``<point>.<role>.armed`` in the directory
named by CHAOS_HOOK_DIR. The first process of that role (CHAOS_ROLE: worker or
drain) to reach the point claims the file by renaming it to
``<point>.<role>.claimed-<pid>``, writes ``<point>.<role>.paused`` with its
pid, and waits until the harness deletes the claimed file or SIGKILLs the
process. The armed file contains the longest pause in seconds, after which
the process goes on by itself.

Points:
- ``after-batch``: a worker's ``metering.apply_batch`` task has committed and
  returned, and the late ack is not sent yet (Celery's task_postrun).
- ``before-delete``: a drain received a 2xx for a batch of events and is about
  to delete the delivered rows (``billing_drain.services.mark_delivered``).

Without CHAOS_HOOK_DIR nothing is patched.
"""

import json
import os
import time
from pathlib import Path

AFTER_BATCH = "after-batch"
BEFORE_DELETE = "before-delete"


def hook_dir():
    directory = os.environ.get("CHAOS_HOOK_DIR")
    return Path(directory) if directory else None


def role():
    return os.environ.get("CHAOS_ROLE", "drain")


def pause_if_armed(point):
    """Pause here when the harness armed ``point`` for this process's role; return True if it paused."""
    directory = hook_dir()
    if directory is None:
        return False
    name = f"{point}.{role()}"
    armed = directory / f"{name}.armed"
    claimed = directory / f"{name}.claimed-{os.getpid()}"
    try:
        os.rename(armed, claimed)
    except FileNotFoundError:
        return False
    try:
        max_seconds = float(json.loads(claimed.read_text())["max_seconds"])
    except (OSError, ValueError, KeyError):
        max_seconds = 10.0
    marker = directory / f"{name}.paused"
    temporary = directory / f"{name}.paused.tmp-{os.getpid()}"
    temporary.write_text(json.dumps({"pid": os.getpid(), "role": role(), "claimed": claimed.name}))
    os.replace(temporary, marker)
    deadline = time.monotonic() + max_seconds
    while claimed.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    claimed.unlink(missing_ok=True)
    return True


def _install():
    if hook_dir() is None:
        return
    from celery.signals import task_postrun

    from billing_drain import services

    original_mark_delivered = services.mark_delivered

    def mark_delivered(rows, destination, report):
        pause_if_armed(BEFORE_DELETE)
        return original_mark_delivered(rows, destination, report)

    services.mark_delivered = mark_delivered

    @task_postrun.connect(weak=False)
    def pause_after_apply_batch(sender=None, **kwargs):
        if getattr(sender, "name", None) == "metering.apply_batch":
            pause_if_armed(AFTER_BATCH)


_install()
