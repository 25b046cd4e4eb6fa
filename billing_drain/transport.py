"""Where sealed events go: PostHog's batch endpoint, or a local outbox file.

Both report the outcome of each request. The PostHog SDK's queued client
(and its ``sync_mode``) drops events silently when a request fails, so the
drain calls ``posthog.request.batch_post``, which raises on any status but 200.
"""

import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path

import requests
from posthog.request import APIError, batch_post

logger = logging.getLogger(__name__)


class DeliveryFailed(Exception):
    """The request failed as a whole and may succeed later (network, timeout, 5xx, 429, auth)."""

    def __init__(self, message, status=None, retry_after=None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class BatchTooLarge(Exception):
    """The endpoint returned 413: send fewer events per request."""


class BatchRejected(Exception):
    """The endpoint returned 400: at least one event in the batch is invalid."""


class PostHogTransport:
    def __init__(self, api_key, host, timeout_seconds):
        self._api_key = api_key
        self.host = host
        self.timeout_seconds = timeout_seconds

    @property
    def destination(self):
        return self.host

    def send(self, events):
        """Post events in one request; return on 200, raise one of this module's errors otherwise."""
        try:
            batch_post(self._api_key, host=self.host, gzip=True, timeout=self.timeout_seconds, batch=events)
        except APIError as error:
            status = error.status
            if status == 413:
                raise BatchTooLarge(f"HTTP 413 for {len(events)} events: {error.message}") from error
            if status == 400:
                raise BatchRejected(f"HTTP 400: {error.message}") from error
            raise DeliveryFailed(f"HTTP {status}: {error.message}", status, error.retry_after) from error
        except requests.RequestException as error:
            raise DeliveryFailed(f"{type(error).__name__}: {error}") from error


class OutboxTransport:
    """Append events as JSON lines to a dated file, fsynced before it reports success."""

    def __init__(self, directory):
        self.directory = Path(directory)

    @property
    def destination(self):
        return str(self.path_for(datetime.now(timezone.utc)))

    def path_for(self, when):
        return self.directory / f"events-{when:%Y-%m-%d}.jsonl"

    def send(self, events):
        path = self.path_for(datetime.now(timezone.utc))
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as outbox:
                for event in events:
                    outbox.write(json.dumps(event, sort_keys=True) + "\n")
                outbox.flush()
                os.fsync(outbox.fileno())
        except OSError as error:
            raise DeliveryFailed(f"could not write the outbox {path}: {error}") from error


def configured_transport():
    """Return the PostHog transport when POSTHOG_API_KEY is set, else the local outbox."""
    from django.conf import settings

    if settings.POSTHOG_API_KEY:
        return PostHogTransport(settings.POSTHOG_API_KEY, settings.POSTHOG_HOST, settings.POSTHOG_TIMEOUT_SECONDS)
    return OutboxTransport(settings.METERING_OUTBOX_DIR)
