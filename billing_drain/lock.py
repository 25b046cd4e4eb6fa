"""The drain's singleton lock: Redis when configured, else a database row.

The lock only keeps drains from doing the same work twice. Billing stays
correct without it: sealing locks rows, sealed rows never change, and a
re-shipped event keeps its uuid, which PostHog deduplicates.
"""

import logging
import os
import socket
import uuid
from datetime import timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

logger = logging.getLogger(__name__)



def _new_token():
    started = timezone.now().strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"{socket.gethostname()}:{os.getpid()} since {started} ({uuid.uuid4().hex[:8]})"


class DrainLockUnavailable(Exception):
    """The lock's store cannot be reached, so no drain can start; the message names the store."""


class RedisDrainLock:
    """A redis-py Lock with a timeout, extended while a long drain runs."""

    def __init__(self, url, timeout_seconds):
        import redis

        self.timeout_seconds = timeout_seconds
        self.description = "Redis"
        self._client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self.name = settings.DRAIN_LOCK_NAME
        self._lock = self._client.lock(self.name, timeout=timeout_seconds, blocking=False)

    def acquire(self):
        import redis

        try:
            return bool(self._lock.acquire(token=_new_token()))
        except redis.exceptions.RedisError as error:
            raise DrainLockUnavailable(f"cannot reach Redis for the drain lock: {error}") from error

    def holder(self):
        try:
            value = self._client.get(self.name)
        except Exception as error:  # noqa: BLE001 - only used for a message
            return f"unknown ({error})"
        return value.decode("utf-8", "replace") if value else None

    def extend(self):
        """Reset the lock's timeout; return False when the lock was lost."""
        import redis

        try:
            self._lock.reacquire()
            return True
        except (redis.exceptions.LockError, redis.exceptions.RedisError) as error:
            logger.warning("drain lock lost: %s", error)
            return False

    def release(self):
        try:
            self._lock.release()
        except Exception as error:  # noqa: BLE001 - release must not raise
            logger.warning("drain lock release failed: %s; it expires by itself", error)


class DatabaseDrainLock:
    """A DrainLease row with an expiry; acquiring it is one conditional UPDATE."""

    def __init__(self, timeout_seconds):
        self.timeout_seconds = timeout_seconds
        self.description = "database"
        self.name = settings.DRAIN_LOCK_NAME
        self._token = _new_token()

    def _lease_model(self):
        from billing_drain.models import DrainLease

        return DrainLease

    def acquire(self):
        lease = self._lease_model()
        now = timezone.now()
        try:
            with transaction.atomic():
                lease.objects.get_or_create(name=self.name, defaults={"expires_at": now})
        except IntegrityError:
            pass
        taken = (
            lease.objects.filter(name=self.name)
            .filter(Q(expires_at__lte=now) | Q(holder=self._token))
            .update(holder=self._token, expires_at=now + timedelta(seconds=self.timeout_seconds))
        )
        return taken == 1

    def holder(self):
        lease = self._lease_model().objects.filter(name=self.name, expires_at__gt=timezone.now()).first()
        return lease.holder if lease else None

    def extend(self):
        lease = self._lease_model()
        extended = lease.objects.filter(name=self.name, holder=self._token).update(
            expires_at=timezone.now() + timedelta(seconds=self.timeout_seconds)
        )
        if not extended:
            logger.warning("drain lock lost: another drain took the expired lease")
        return extended == 1

    def release(self):
        try:
            self._lease_model().objects.filter(name=self.name, holder=self._token).update(
                holder="", expires_at=timezone.now()
            )
        except Exception as error:  # noqa: BLE001 - release must not raise
            logger.warning("drain lock release failed: %s; it expires by itself", error)


def lock_redis_url():
    """Return REDIS_URL, or the broker URL when the broker is Redis, else None."""
    if settings.REDIS_URL:
        return settings.REDIS_URL
    broker = settings.CELERY_BROKER_URL or ""
    if broker.startswith(("redis://", "rediss://")):
        return broker
    return None


def drain_lock():
    url = lock_redis_url()
    if url:
        return RedisDrainLock(url, settings.DRAIN_LOCK_TIMEOUT_SECONDS)
    return DatabaseDrainLock(settings.DRAIN_LOCK_TIMEOUT_SECONDS)
