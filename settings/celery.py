"""The Celery application shared by workers, beat and the metering client."""

import os
import socket

from celery import Celery
from celery.signals import celeryd_init, task_prerun

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings")

app = Celery("metering")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["metering", "billing_drain"])


# TCP keepalive probes that notice a Redis host that is gone within about a minute.
_KEEPALIVE_OPTIONS = {
    option: value
    for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3))
    if (option := getattr(socket, name, None)) is not None
}


@celeryd_init.connect
def wait_out_a_frozen_broker(conf=None, **kwargs):
    """Let a worker's reads from Redis wait for the reply instead of timing out.

    kombu 5.6's Redis transport acknowledges a message by deleting it from
    Redis first and forgetting the delivery locally only after that. An ack
    that times out against a frozen Redis therefore leaves a delivery that
    counts against the prefetch limit for good, and with a prefetch of 1 the
    worker stops consuming without logging anything more. Without a read
    timeout the ack completes once Redis replies again. A stopped Redis resets
    the connection, and keepalive probes notice a host that is gone, after
    which Celery reconnects with fresh state. Processes that only publish,
    such as control-plane processes, keep the timeout from the settings.
    """
    options = dict(conf.broker_transport_options or {})
    if options.get("socket_timeout") is None:
        return
    options["socket_timeout"] = None
    options["socket_keepalive"] = True
    options["socket_keepalive_options"] = _KEEPALIVE_OPTIONS
    # The app reads its configuration from Django settings under the CELERY_ namespace.
    conf["CELERY_BROKER_TRANSPORT_OPTIONS"] = options


@task_prerun.connect
def close_unusable_database_connections(**kwargs):
    """Close database connections that failed or outlived CONN_MAX_AGE, so the task opens a fresh one."""
    from django.db import close_old_connections

    close_old_connections()
