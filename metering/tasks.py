"""Celery tasks that write usage into the buffer. Thin callers of metering.buffer."""

import functools
import logging

from celery import shared_task
from celery.exceptions import Reject
from django.conf import settings
from django.db import DatabaseError, DataError

from metering import buffer
from metering.confirmations import confirm_done
from metering.connections import connection_row, parse_message_time
from metering.units import InvalidUsage

logger = logging.getLogger(__name__)

_RETRY_BACKOFF_MAX_SECONDS = 60


def _confirms_when_done(run):
    """Wrap a bound task so that it confirms its task id to the sender once it returns (metering.confirmations).

    A task returns once the message is applied, skipped as a redelivery or
    rejected for good. A retry raises instead, so it is not confirmed.
    """

    @functools.wraps(run)
    def run_and_confirm(self, *args, **kwargs):
        result = run(self, *args, **kwargs)
        confirm_done(self.request.id)
        return result

    return run_and_confirm


@shared_task(name="metering.apply_batch", bind=True, max_retries=None)
@_confirms_when_done
def apply_batch(self, batch_id=None, rows=None, **unexpected):
    """Apply a batch from the metering client; a redelivered batch counts once."""
    if unexpected:
        logger.error(
            "rejected malformed batch %r: unknown arguments %s; accepted are batch_id, rows; the message is dropped",
            batch_id,
            ", ".join(sorted(unexpected)),
        )
        return 0
    try:
        applied = buffer.apply_batch(batch_id, rows)
    except buffer.InvalidMessage as error:
        logger.error("rejected malformed batch %r: %s; the message is dropped", batch_id, error)
        return 0
    except DataError as error:
        _log_unstorable("batch", batch_id, error)
        return 0
    except DatabaseError as error:
        _retry_later(self, error, batch_id)
    if applied == 0:
        logger.info("batch %s was applied before; skipped as a redelivery", batch_id)
    return applied


@shared_task(name="metering.record_connection_end", bind=True, max_retries=None)
@_confirms_when_done
def record_connection_end(
    self,
    org_id=None,
    cores=None,
    memory=None,
    started_at=None,
    ended_at=None,
    duration_seconds=None,
    end_reason="client_disconnect",
    connection_id=None,
    **unexpected,
):
    """Apply one connection end sent by name, at most once per ``connection_id``.

    Sizes are Kubernetes quantity strings, times ISO 8601 strings with a zone.
    """
    if unexpected:
        logger.error(
            "rejected connection end %r: unknown arguments %s; accepted are org_id, cores, memory, "
            "started_at, ended_at, duration_seconds, end_reason, connection_id",
            connection_id,
            ", ".join(sorted(unexpected)),
        )
        return 0
    try:
        row = connection_row(
            org_id,
            cores,
            memory,
            started_at=parse_message_time(started_at, "started_at"),
            ended_at=parse_message_time(ended_at, "ended_at"),
            duration_seconds=duration_seconds,
            end_reason=end_reason,
            connection_id=connection_id,
            bucket_seconds=settings.METERING_BUCKET_SECONDS,
            memory_per_core_gib=settings.METERING_MEMORY_PER_CORE_GIB,
            max_connection_seconds=settings.METERING_MAX_CONNECTION_SECONDS,
        )
    except InvalidUsage as error:
        logger.error("rejected connection end %r for org %r: %s", connection_id, org_id, error)
        return 0
    try:
        applied = buffer.apply_connection_rows([row])
    except buffer.InvalidMessage as error:
        logger.error("rejected connection end %r for org %r: %s", connection_id, org_id, error)
        return 0
    except DataError as error:
        _log_unstorable("connection end", connection_id, error)
        return 0
    except DatabaseError as error:
        _retry_later(self, error, connection_id)
    if applied == 0:
        logger.info("connection %s was applied before; skipped as a redelivery", connection_id)
    return applied


def _log_unstorable(kind, message_id, error):
    # PostgreSQL rejected the values themselves (out of range, not storable), so a retry would fail the same way.
    logger.error(
        "rejected %s %r: the database cannot store its values: %s; the message is dropped", kind, message_id, error
    )


def _retry_later(task, error, message_id):
    countdown = min(2 ** min(task.request.retries, 6), _RETRY_BACKOFF_MAX_SECONDS)
    logger.warning("database error applying %s: %s; retrying in %s s", message_id, error, countdown)
    try:
        raise task.retry(exc=error, countdown=countdown)
    except Reject as rejected:
        # Celery rejects the message without requeueing it when it cannot publish the retry (the
        # broker is down or frozen), which would drop the message. Requeue it instead. If the broker
        # cannot take that either, the message stays unacknowledged and the broker redelivers it
        # after its visibility timeout.
        logger.warning(
            "could not schedule the retry of %s: %s; returning the message to the broker", message_id, rejected.reason
        )
        raise Reject(rejected.reason, requeue=True) from error
