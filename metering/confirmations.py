"""Confirmations that a worker is done with a message, kept next to the broker.

Why: kombu's Redis transport takes a message off the queue (BRPOP) before it
records the message as unacknowledged. A worker killed, or a Redis stopped,
between those two steps loses the message, and ``acks_late`` cannot help
because the message was never recorded. kombu's filesystem transport deletes
a message's file when a worker takes it, so a worker killed with SIGKILL
loses the messages it had taken and not finished. So the worker confirms
each message it is done with. The sender keeps what it sent until the confirmation arrives.
After a timeout it sends the same message again under the same id, and the
buffer applies it at most once.

The worker writes ``metering:done:<task id>`` to Redis (or a file named after
the task id, with the filesystem broker) after the transaction that applied
the message has committed, also when the message was a redelivery it
skipped or input it rejected for good: sending it again would change nothing.
The metering client sets the task id to the batch id. A sender reads its
confirmations and deletes them. Unread keys expire after ``TTL_SECONDS``; a
confirmation that expired unread only costs one more send of the same message.
"""

import hashlib
import logging
import os
import time
from pathlib import Path

logger = logging.getLogger(__name__)

KEY_PREFIX = "metering:done:"
TTL_SECONDS = 3600
# Ids per MGET or DEL, so that one call to Redis stays small.
_IDS_PER_CALL = 1000


class RedisConfirmations:
    """Confirmations as Redis keys that expire after TTL_SECONDS, on the broker's Redis."""

    def __init__(self, url, timeout_seconds):
        import redis

        self._client = redis.Redis.from_url(
            url, socket_timeout=timeout_seconds, socket_connect_timeout=timeout_seconds
        )

    def confirm(self, message_id):
        """Record that a worker is done with ``message_id``. Raises redis errors."""
        self._client.set(KEY_PREFIX + message_id, b"1", ex=TTL_SECONDS)

    def take_confirmed(self, message_ids):
        """Return the set of ``message_ids`` that were confirmed, and delete their confirmations.

        Raises redis errors, and the caller reads again later.
        """
        confirmed = set()
        message_ids = list(message_ids)
        for start in range(0, len(message_ids), _IDS_PER_CALL):
            chunk = message_ids[start : start + _IDS_PER_CALL]
            keys = [KEY_PREFIX + message_id for message_id in chunk]
            found = [key for key, value in zip(keys, self._client.mget(keys)) if value is not None]
            if found:
                self._client.delete(*found)
                confirmed.update(key[len(KEY_PREFIX) :] for key in found)
        return confirmed


class FileConfirmations:
    """Confirmations as empty files in one directory, for the filesystem broker on one machine.

    A file is named after a hash of the message id, so any id makes a valid
    name. Unread files are deleted once older than TTL_SECONDS, checked
    every ``_PRUNE_EVERY`` confirmations.
    """

    _PRUNE_EVERY = 1000

    def __init__(self, directory):
        self.directory = Path(directory)
        self._confirmed_since_prune = 0

    def _path(self, message_id):
        return self.directory / hashlib.sha256(message_id.encode("utf-8", "surrogatepass")).hexdigest()

    def confirm(self, message_id):
        """Record that a worker is done with ``message_id``. Raises OSError."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._path(message_id).touch()
        self._confirmed_since_prune += 1
        if self._confirmed_since_prune >= self._PRUNE_EVERY:
            self._confirmed_since_prune = 0
            self._prune()

    def take_confirmed(self, message_ids):
        """Return the set of ``message_ids`` that were confirmed, and delete their confirmations."""
        confirmed = set()
        for message_id in message_ids:
            try:
                self._path(message_id).unlink()
            except FileNotFoundError:
                continue
            confirmed.add(message_id)
        return confirmed

    def _prune(self):
        expired = time.time() - TTL_SECONDS
        for entry in os.scandir(self.directory):
            try:
                if entry.stat().st_mtime < expired:
                    os.unlink(entry.path)
            except FileNotFoundError:
                continue


def confirmations_from_settings():
    """Return the confirmations store for the configured broker, or None when confirmations are off.

    Redis brokers keep confirmations in the same Redis, the filesystem broker
    in a directory next to its queue. METERING_CONFIRM_SECONDS set to 0 turns
    confirmations off.
    """
    from django.conf import settings

    if not settings.METERING_CONFIRM_SECONDS:
        return None
    url = settings.CELERY_BROKER_URL or ""
    if url.startswith(("redis://", "rediss://")):
        return RedisConfirmations(url, float(settings.METERING_PUBLISH_TIMEOUT_SECONDS))
    if url.startswith("filesystem://"):
        return FileConfirmations(settings.CELERY_BROKER_DIR / "confirmed")
    return None


_worker_confirmations = None


def confirm_done(message_id):
    """Confirm from a worker that it is done with ``message_id``, logging any failure instead of raising.

    When a confirmation cannot be written, the sender sends the message again
    after its timeout, and the worker skips it as a redelivery and confirms it.
    """
    global _worker_confirmations
    if not message_id:
        return
    try:
        if _worker_confirmations is None:
            _worker_confirmations = confirmations_from_settings() or False
        if _worker_confirmations:
            _worker_confirmations.confirm(message_id)
    except Exception as error:  # noqa: BLE001 - the message is applied; the sender will ask again
        logger.warning("could not confirm message %s to its sender: %s; it will be sent again", message_id, error)
