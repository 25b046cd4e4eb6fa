"""The Celery application shared by workers, beat and the metering client."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings")

app = Celery("metering")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["metering", "billing_drain"])
