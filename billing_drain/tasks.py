"""The drain as a Celery beat task. A thin caller of billing_drain.services."""

import logging

from celery import shared_task

from billing_drain.services import DrainLockHeld, DrainLockUnavailable, drain_with_lock

logger = logging.getLogger(__name__)


@shared_task(name="billing_drain.drain", ignore_result=True)
def drain():
    """Run one drain unless another one holds the lock."""
    try:
        report = drain_with_lock()
    except DrainLockHeld as held:
        logger.info("drain skipped: %s; the next beat tick tries again", held)
        return None
    except DrainLockUnavailable as error:
        logger.error("drain skipped: %s; the next beat tick tries again", error)
        return None
    return report.delivered_events
