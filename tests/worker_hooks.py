"""Test-only hooks that a Celery worker loads with ``--include tests.worker_hooks``.

With METERING_TEST_PAUSE_AFTER_TASK_SECONDS and METERING_TEST_PAUSE_MARKER
set, the process that runs the first ``metering.apply_batch`` task writes the
marker file (``{"task_id": ..., "pid": ...}``) and then sleeps that long.
Celery sends ``task_postrun`` after the task's transaction has committed and
before a late ack (CELERY_TASK_ACKS_LATE), so a test can kill the worker or
its pool process in that window. Tasks that run after the marker exists do
not pause.
"""

import json
import os
import time
from pathlib import Path

from celery.signals import task_postrun

PAUSE_SECONDS_VARIABLE = "METERING_TEST_PAUSE_AFTER_TASK_SECONDS"
MARKER_VARIABLE = "METERING_TEST_PAUSE_MARKER"


@task_postrun.connect
def pause_after_first_apply_batch(sender=None, task_id=None, **kwargs):
    pause_seconds = float(os.environ.get(PAUSE_SECONDS_VARIABLE) or 0)
    marker = os.environ.get(MARKER_VARIABLE)
    if pause_seconds <= 0 or not marker or getattr(sender, "name", None) != "metering.apply_batch":
        return
    marker = Path(marker)
    if marker.exists():
        return
    # Written under another name and renamed, so a reader never sees half a file.
    partial = marker.with_name(marker.name + ".partial")
    partial.write_text(json.dumps({"task_id": task_id, "pid": os.getpid()}))
    partial.rename(marker)
    time.sleep(pause_seconds)
