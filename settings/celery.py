"""The Celery application shared by workers, beat and the metering client."""

import os

from celery import Celery
from celery.signals import task_prerun

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings")

app = Celery("metering")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["metering", "billing_drain"])


@task_prerun.connect
def close_unusable_database_connections(**kwargs):
    """Close database connections that failed or outlived CONN_MAX_AGE, so the task opens a fresh one."""
    from django.db import close_old_connections

    close_old_connections()
