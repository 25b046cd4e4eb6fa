import os
import threading
import uuid

import pytest
import redis
from django.db import connection

from tests.capture_server import CaptureServer
from tests.processes import CeleryProcess


@pytest.fixture
def capture_server():
    with CaptureServer(api_key="phc_test_key") as server:
        yield server


@pytest.fixture
def posthog_settings(settings, capture_server):
    """Point the drain at the local capture server."""
    settings.POSTHOG_API_KEY = "phc_test_key"
    settings.POSTHOG_HOST = capture_server.url
    settings.POSTHOG_TIMEOUT_SECONDS = 5
    return settings


@pytest.fixture
def redis_client(settings):
    """A Redis client, and a drain lock name of this test's own.

    Tests share one Redis database with other test runs, so nothing here
    flushes it: each test uses its own queue and lock keys.
    """
    settings.DRAIN_LOCK_NAME = f"billing-drain-test-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15"))
    yield client
    client.delete(settings.DRAIN_LOCK_NAME)
    client.close()


@pytest.fixture
def worker_env(transactional_db, tmp_path, redis_client):
    """Environment for worker processes: the test database and a queue of this test's own."""
    database = connection.settings_dict
    env = dict(os.environ)
    env["DATABASE_URL"] = (
        f"postgres://{database['USER']}@{database['HOST'] or '127.0.0.1'}:{database['PORT'] or 5432}/{database['NAME']}"
    )
    env["CELERY_QUEUE"] = f"test-{uuid.uuid4().hex[:8]}"
    env["METERING_DATA_DIR"] = str(tmp_path / "var")
    env["CELERY_VISIBILITY_TIMEOUT"] = "5"
    return env


@pytest.fixture
def start_worker(worker_env, tmp_path):
    """Start real Celery workers on this test's queue; all are stopped at the end of the test."""
    started = []

    def start(extra_env=None, name="worker"):
        env = {**worker_env, **(extra_env or {})}
        process = CeleryProcess("worker", env, tmp_path / f"{name}-{len(started)}.log").start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


class RowLock:
    """A row lock on one UsageBucket, held by another thread and connection as an increment's would be."""

    def __init__(self, row_id):
        self.row_id = row_id
        self._holding = threading.Event()
        self._release = threading.Event()
        self._thread = threading.Thread(target=self._hold)

    def _hold(self):
        from django.db import transaction

        from metering.models import UsageBucket

        try:
            with transaction.atomic():
                UsageBucket.objects.select_for_update().get(id=self.row_id)
                self._holding.set()
                self._release.wait(10)
        finally:
            connection.close()

    def acquire(self):
        self._thread.start()
        if not self._holding.wait(10):
            raise TimeoutError(f"the lock on usage bucket {self.row_id} was not taken within 10 s")

    def release(self):
        """End the holder's transaction and wait for its thread. Calling it again does nothing."""
        self._release.set()
        if self._thread.is_alive():
            self._thread.join(10)


@pytest.fixture
def lock_row():
    """Return a function that locks a UsageBucket row from another connection. Every lock ends with the test."""
    locks = []

    def lock(row_id):
        row_lock = RowLock(row_id)
        locks.append(row_lock)
        row_lock.acquire()
        return row_lock

    yield lock
    for row_lock in locks:
        row_lock.release()
