"""Test-only hooks that a Celery worker loads with ``--include tests.worker_hooks``.

With METERING_TEST_PAUSE_AFTER_TASK_SECONDS set, the worker sleeps that long
after each ``metering.apply_batch`` task returns. Celery sends ``task_postrun``
after the task's transaction has committed and before a late ack
(CELERY_TASK_ACKS_LATE), so a test can kill the worker in that window. When
METERING_TEST_PAUSE_MARKER names a file, the handler writes the task id to it
as the pause starts.
"""

import os
import time
from pathlib import Path

from celery.signals import task_postrun

PAUSE_SECONDS_VARIABLE = "METERING_TEST_PAUSE_AFTER_TASK_SECONDS"
MARKER_VARIABLE = "METERING_TEST_PAUSE_MARKER"


@task_postrun.connect
def pause_after_apply_batch(sender=None, task_id=None, **kwargs):
    pause_seconds = float(os.environ.get(PAUSE_SECONDS_VARIABLE) or 0)
    if pause_seconds <= 0 or getattr(sender, "name", None) != "metering.apply_batch":
        return
    marker = os.environ.get(MARKER_VARIABLE)
    if marker:
        Path(marker).write_text(str(task_id))
    time.sleep(pause_seconds)
