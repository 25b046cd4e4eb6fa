"""Integration tests for metering when the Redis broker or the worker fails.

Every test starts its own ``redis-server`` on a free 127.0.0.1 port, so it can
kill, freeze (SIGSTOP) and restart that server without touching the shared
Redis on 6379. The metering client publishes through ``publish_with_celery``
to a Celery app that writes to the private server, and real ``celery worker``
processes consume from it into the pytest-django PostgreSQL test database.

Expected usage is computed here by hand with Fractions, independently of
``metering.units``.
"""

import functools
import json
import math
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

import pytest
import redis
from celery import Celery
from django.conf import settings
from django.db.models import Sum

from metering.client import MeteringClient, publish_with_celery
from metering.confirmations import KEY_PREFIX, RedisConfirmations
from metering.models import AppliedMessage, UsageBucket
from tests.processes import CeleryProcess, wait_until

pytestmark = pytest.mark.integration

PUBLISH_TIMEOUT_SECONDS = 0.5
# Against a frozen server one publish_with_celery call waited out three socket
# timeouts with kombu 5.6 and redis-py 6.4: the LPUSH, then the PING of each of
# two reconnects. The slack only keeps a loaded machine from failing the test.
FLUSH_LIMIT_SECONDS = 3 * PUBLISH_TIMEOUT_SECONDS + 3.0
# Catches a record() that blocks on the broker; not a speed target.
RECORD_LOOP_LIMIT_SECONDS = 2.0
BUFFER_WAIT_SECONDS = 30.0

BUCKET_SECONDS = 60
MEMORY_PER_CORE_GIB = 2
# Every connection ends at the same instant, so each org has one bucket.
ENDED_AT = 1_750_000_000.0
ORGS = ("org-alpha", "org-beta", "org-gamma")
# (cores quantity, memory quantity, cores, memory in GiB)
SIZES = (
    ("2", "8Gi", Fraction(2), Fraction(8)),
    ("500m", "1Gi", Fraction(1, 2), Fraction(1)),
    ("1", "1536Mi", Fraction(1), Fraction(3, 2)),
    ("250m", "3G", Fraction(1, 4), Fraction(3 * 10**9, 2**30)),
)
# (duration in seconds as the caller passes it, billed whole seconds)
DURATIONS = ((0.2, 1), (9.2, 10), (59.999, 60), (3.0, 3), (0.0, 1))

# kombu's Redis transport keeps delivered, unacknowledged messages in this
# hash and their delivery times in this sorted set (default key names).
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"


class Totals(NamedTuple):
    compute_milli: int
    cpu_milli: int
    memory_milli: int
    connections: int


class Connection(NamedTuple):
    org_id: str
    cores: str
    memory: str
    duration_seconds: float
    totals: Totals


def round_half_up_milli(value):
    return math.floor(value * 1000 + Fraction(1, 2))


def make_connection(index):
    org_id = ORGS[index % len(ORGS)]
    cores, memory, core_count, memory_gib = SIZES[(index // len(ORGS)) % len(SIZES)]
    duration, billed = DURATIONS[(index // (len(ORGS) * len(SIZES))) % len(DURATIONS)]
    per_second = max(core_count, memory_gib / MEMORY_PER_CORE_GIB)
    totals = Totals(
        compute_milli=round_half_up_milli(per_second * billed),
        cpu_milli=round_half_up_milli(core_count * billed),
        memory_milli=round_half_up_milli(memory_gib * billed),
        connections=1,
    )
    return Connection(org_id, cores, memory, duration, totals)


def make_connections(start, count):
    return [make_connection(index) for index in range(start, start + count)]


def expected_totals(connections):
    sums = {}
    for connection in connections:
        previous = sums.get(connection.org_id, Totals(0, 0, 0, 0))
        sums[connection.org_id] = Totals(*(a + b for a, b in zip(previous, connection.totals)))
    return sums


def record_all(client, connections):
    for connection in connections:
        client.record(
            connection.org_id,
            connection.cores,
            connection.memory,
            ended_at=ENDED_AT,
            duration_seconds=connection.duration_seconds,
        )


def buffer_totals():
    """Sum the open buffer rows of each org."""
    rows = (
        UsageBucket.objects.filter(state=UsageBucket.State.OPEN)
        .values("org_id")
        .annotate(
            compute_milli=Sum("compute_milli"),
            cpu_milli=Sum("cpu_milli"),
            memory_milli=Sum("memory_milli"),
            connections=Sum("connections"),
        )
    )
    return {
        row["org_id"]: Totals(row["compute_milli"], row["cpu_milli"], row["memory_milli"], row["connections"])
        for row in rows
    }


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RedisServer:
    """A ``redis-server`` subprocess on 127.0.0.1 that this test owns and may kill or freeze."""

    def __init__(self, directory):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process = None

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self):
        log = open(self.directory / "redis.log", "ab")
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--daemonize", "no",
                "--dir", str(self.directory),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_until(self._answers_ping, 10, message=f"redis-server on port {self.port} to answer PING")
        return self

    def _answers_ping(self):
        if self.process.poll() is not None:
            raise RuntimeError(f"redis-server on port {self.port} exited with status {self.process.returncode}")
        try:
            with self.client() as client:
                return client.ping()
        except redis.RedisError:
            return False

    def client(self):
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, socket_connect_timeout=5)

    def kill(self):
        self.process.kill()
        self.process.wait(10)

    def freeze(self):
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self):
        self.process.send_signal(signal.SIGCONT)

    def stop(self):
        """Resume the server (it may be frozen) and terminate it. Never raises."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        except OSError:
            pass


class Publisher:
    """``publish_with_celery`` bound to a Celery app that writes to the private server.

    ``batch_ids`` lists the batch id of every publish attempt, in order.
    """

    def __init__(self, broker_url, queue):
        self.queue = queue
        self.batch_ids = []
        self.app = Celery("metering-broker-fault-tests", set_as_current=False)
        # Celery prefers the CELERY_BROKER_URL environment variable (the shared
        # Redis under bin/run-tests) over broker_url, but the producer pool
        # connects to broker_write_url when it is set.
        self.app.conf.broker_write_url = broker_url
        # The project's options with its socket timeouts shortened, so a
        # timeout missing from settings makes the frozen-server test hang.
        options = dict(settings.CELERY_BROKER_TRANSPORT_OPTIONS)
        for key in ("socket_timeout", "socket_connect_timeout"):
            if key in options:
                options[key] = PUBLISH_TIMEOUT_SECONDS
        self.app.conf.broker_transport_options = options
        self.app.conf.broker_connection_timeout = PUBLISH_TIMEOUT_SECONDS
        self._publish = functools.partial(publish_with_celery, app=self.app, queue=queue)

    def __call__(self, batch_id, rows, timeout_seconds):
        self.batch_ids.append(batch_id)
        self._publish(batch_id, rows, timeout_seconds)

    def close(self):
        self.app.close()


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def publisher(redis_server, worker_env, monkeypatch):
    monkeypatch.delenv("CELERY_BROKER_WRITE_URL", raising=False)
    publisher = Publisher(redis_server.url, worker_env["CELERY_QUEUE"])
    yield publisher
    publisher.close()


def new_client(publisher, **options):
    return MeteringClient(
        bucket_seconds=BUCKET_SECONDS,
        memory_per_core_gib=MEMORY_PER_CORE_GIB,
        max_connection_seconds=86400,
        # The flusher thread waits this long before its first flush, so only
        # the test's own flush() calls publish.
        flush_seconds=3600,
        publish_timeout_seconds=PUBLISH_TIMEOUT_SECONDS,
        publish=publisher,
        register_exit_flush=False,
        **options,
    )


@pytest.fixture
def metering_client(publisher):
    client = new_client(publisher)
    yield client
    client.close(timeout=FLUSH_LIMIT_SECONDS)


@pytest.fixture
def start_broker_worker(redis_server, worker_env, tmp_path):
    """Start real Celery workers that consume this test's queue on the private server.

    ``extra_args`` go to ``celery worker``; all workers are stopped at the end
    of the test.
    """
    started = []

    def start(extra_env=None, extra_args=()):
        env = {**worker_env, "CELERY_BROKER_URL": redis_server.url, **(extra_env or {})}
        log_path = tmp_path / f"worker-{len(started)}.log"
        process = CeleryProcess("worker", env, log_path, extra_args=extra_args)
        started.append(process)
        return process.start()

    yield start
    for process in started:
        process.stop()


def flush_within(client, seconds):
    """Run client.flush() in a thread; fail the test if it has not returned after ``seconds``."""
    outcome = {}

    def run():
        try:
            outcome["result"] = client.flush()
        except BaseException as error:  # noqa: BLE001 - reported by the assert below
            outcome["error"] = error

    thread = threading.Thread(target=run, name="test-flush", daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"client.flush() did not return within {seconds} s"
    assert "error" not in outcome, f"client.flush() raised {outcome.get('error')!r}"
    return outcome["result"]


def queued_task_ids(server, queue):
    with server.client() as client:
        return [json.loads(raw)["headers"]["id"] for raw in client.lrange(queue, 0, -1)]


def wait_until_drained(server, queue):
    """Wait until the queue is empty and every delivered message was acknowledged."""

    def drained():
        with server.client() as client:
            return client.llen(queue) == 0 and client.hlen(UNACKED_KEY) == 0

    wait_until(drained, BUFFER_WAIT_SECONDS, message=f"queue {queue} to be consumed and acknowledged")


def received_count(worker, task_id):
    return worker.log_text().count(f"Task metering.apply_batch[{task_id}] received")


def redelivery_line(batch_id):
    return f"batch {batch_id} was applied before; skipped as a redelivery"


def test_record_and_flush_survive_dead_redis(redis_server, metering_client, publisher, start_broker_worker):
    worker = start_broker_worker()
    warm_up = make_connections(0, len(ORGS))
    record_all(metering_client, warm_up)
    assert flush_within(metering_client, FLUSH_LIMIT_SECONDS) is True
    wait_until(lambda: buffer_totals() == expected_totals(warm_up), BUFFER_WAIT_SECONDS,
               message="the warm-up batch in the buffer")

    redis_server.kill()
    outage = make_connections(len(warm_up), 1000)
    started = time.monotonic()
    record_all(metering_client, outage)
    record_seconds = time.monotonic() - started
    assert record_seconds < RECORD_LOOP_LIMIT_SECONDS, f"1000 record() calls took {record_seconds:.2f} s"

    assert flush_within(metering_client, FLUSH_LIMIT_SECONDS) is False
    stats = metering_client.stats()
    assert stats["publish_failures"] >= 1
    assert stats["pending_rows"] == len(ORGS)
    assert stats["recorded"] == len(warm_up) + len(outage)
    assert stats.get("dropped", 0) == 0
    assert stats.get("invalid", 0) == 0

    redis_server.start()
    assert flush_within(metering_client, FLUSH_LIMIT_SECONDS) is True
    assert metering_client.stats()["pending_rows"] == 0

    # The worker that was running when the server died has to reconnect by itself.
    expected = expected_totals(warm_up + outage)
    wait_until(lambda: buffer_totals() == expected, BUFFER_WAIT_SECONDS, message="the outage batch in the buffer")
    wait_until_drained(redis_server, publisher.queue)
    assert buffer_totals() == expected
    assert "Connection to broker lost" in worker.log_text()


def test_frozen_redis_counts_once(redis_server, metering_client, publisher, start_broker_worker):
    # A first publish leaves an open pooled connection, so the publish during
    # the freeze writes its LPUSH into a socket the frozen server reads later.
    warm_up = make_connections(0, len(ORGS))
    record_all(metering_client, warm_up)
    assert flush_within(metering_client, FLUSH_LIMIT_SECONDS) is True

    redis_server.freeze()
    outage = make_connections(len(warm_up), 1000)
    started = time.monotonic()
    record_all(metering_client, outage)
    record_seconds = time.monotonic() - started
    assert record_seconds < RECORD_LOOP_LIMIT_SECONDS, f"1000 record() calls took {record_seconds:.2f} s"

    assert flush_within(metering_client, FLUSH_LIMIT_SECONDS) is False
    stats = metering_client.stats()
    assert stats["publish_failures"] >= 1
    assert stats["pending_rows"] == len(ORGS)
    frozen_batch_id = publisher.batch_ids[-1]

    redis_server.thaw()
    wait_until(
        lambda: frozen_batch_id in queued_task_ids(redis_server, publisher.queue),
        10,
        message=f"the timed-out publish of batch {frozen_batch_id} to reach the queue after SIGCONT",
    )

    worker = start_broker_worker()
    assert flush_within(metering_client, FLUSH_LIMIT_SECONDS) is True
    assert publisher.batch_ids[-1] == frozen_batch_id, "the retried batch must keep its batch id"

    expected = expected_totals(warm_up + outage)
    wait_until(lambda: buffer_totals() == expected, BUFFER_WAIT_SECONDS, message="every batch in the buffer")
    wait_until_drained(redis_server, publisher.queue)
    assert buffer_totals() == expected
    assert received_count(worker, frozen_batch_id) >= 2
    assert redelivery_line(frozen_batch_id) in worker.log_text()


def one_batch_row():
    return {
        "org_id": "org-alpha",
        "bucket_start": 1_749_999_960,
        "bucket_seconds": BUCKET_SECONDS,
        "compute_milli": 4_000,
        "cpu_milli": 2_000,
        "memory_milli": 8_000,
        "connections": 1,
        "end_reasons": {"client_disconnect": 1},
    }


ONE_ROW_TOTALS = {"org-alpha": Totals(4_000, 2_000, 8_000, 1)}


def test_duplicate_batch_message_counts_once(redis_server, publisher, start_broker_worker):
    worker = start_broker_worker()
    batch_id = str(uuid.uuid4())

    publisher(batch_id, [one_batch_row()], PUBLISH_TIMEOUT_SECONDS)
    publisher(batch_id, [one_batch_row()], PUBLISH_TIMEOUT_SECONDS)

    wait_until(lambda: received_count(worker, batch_id) == 2, BUFFER_WAIT_SECONDS,
               message=f"the worker to receive both copies of batch {batch_id}")
    wait_until_drained(redis_server, publisher.queue)
    assert buffer_totals() == ONE_ROW_TOTALS
    assert AppliedMessage.objects.filter(key=f"batch:{batch_id}").count() == 1
    assert redelivery_line(batch_id) in worker.log_text()


def start_paused_worker(start_broker_worker, marker):
    """Start a prefork worker that pauses after its first task, before the late ack."""
    return start_broker_worker(
        extra_env={
            "METERING_TEST_PAUSE_AFTER_TASK_SECONDS": "120",
            "METERING_TEST_PAUSE_MARKER": str(marker),
        },
        # Celery 5.6 schedules every ack on the consumer's event loop
        # (call_soon), and the solo pool runs the task on that loop, so even an
        # early ack waits until the task returns. Only the prefork pool
        # (Celery's default) shows what CELERY_TASK_ACKS_LATE changes.
        extra_args=["--include", "tests.worker_hooks", "--pool", "prefork", "--concurrency", "1"],
    )


def wait_for_pause(marker, batch_id):
    """Wait until the worker pauses after the task of ``batch_id``; return the marker's contents."""
    wait_until(marker.exists, BUFFER_WAIT_SECONDS, message=f"the worker to pause after batch {batch_id}")
    pause = json.loads(marker.read_text())
    assert pause["task_id"] == batch_id
    return pause


def test_worker_killed_before_ack_counts_once(redis_server, publisher, start_broker_worker, worker_env, tmp_path):
    marker = tmp_path / "paused-task.json"
    paused_worker = start_paused_worker(start_broker_worker, marker)
    batch_id = str(uuid.uuid4())
    publisher(batch_id, [one_batch_row()], PUBLISH_TIMEOUT_SECONDS)

    wait_for_pause(marker, batch_id)
    assert buffer_totals() == ONE_ROW_TOTALS
    with redis_server.client() as client:
        assert client.hlen(UNACKED_KEY) == 1, "the message must still be unacknowledged during the pause"
        delivered_at = client.zrange(UNACKED_INDEX_KEY, 0, 0, withscores=True)[0][1]

    paused_worker.kill()

    # kombu 5.6 restores an unacknowledged message once it is older than the
    # visibility timeout, checked when a worker starts polling and then only
    # every 100 s (every tenth 10 s tick), so the new worker starts after it.
    visibility_timeout = float(worker_env["CELERY_VISIBILITY_TIMEOUT"])
    wait_until(lambda: time.time() > delivered_at + visibility_timeout + 0.5, visibility_timeout + 5,
               message="the visibility timeout to pass")
    worker = start_broker_worker()

    wait_until(lambda: received_count(worker, batch_id) == 1, BUFFER_WAIT_SECONDS,
               message=f"the new worker to receive batch {batch_id} again")
    wait_until_drained(redis_server, publisher.queue)
    assert buffer_totals() == ONE_ROW_TOTALS
    assert redelivery_line(batch_id) in worker.log_text()


def test_pool_process_killed_counts_once(redis_server, publisher, start_broker_worker, tmp_path):
    marker = tmp_path / "paused-task.json"
    worker = start_paused_worker(start_broker_worker, marker)
    batch_id = str(uuid.uuid4())
    publisher(batch_id, [one_batch_row()], PUBLISH_TIMEOUT_SECONDS)

    pause = wait_for_pause(marker, batch_id)
    assert pause["pid"] != worker.process.pid, "the task must run in a pool process"
    assert buffer_totals() == ONE_ROW_TOTALS

    # The worker's main process detects that its pool process died and, with
    # CELERY_TASK_REJECT_ON_WORKER_LOST, puts the message back at once
    # instead of acknowledging it as failed.
    os.kill(pause["pid"], signal.SIGKILL)

    wait_until(lambda: received_count(worker, batch_id) == 2, BUFFER_WAIT_SECONDS,
               message=f"the worker to receive batch {batch_id} again")
    wait_until_drained(redis_server, publisher.queue)
    assert buffer_totals() == ONE_ROW_TOTALS
    assert redelivery_line(batch_id) in worker.log_text()


@pytest.fixture
def confirming_client(redis_server, publisher):
    """A client that keeps each batch until a worker confirms it, and sends it again after 1 s without one."""
    client = new_client(
        publisher, confirmations=RedisConfirmations(redis_server.url, PUBLISH_TIMEOUT_SECONDS), confirm_seconds=1
    )
    yield client
    client.close(timeout=FLUSH_LIMIT_SECONDS)


def flush_until_confirmed(client):
    """Flush every 0.1 s until every published batch was confirmed."""
    wait_until(
        lambda: flush_within(client, FLUSH_LIMIT_SECONDS) and client.stats()["unconfirmed_rows"] == 0,
        BUFFER_WAIT_SECONDS,
        message="a worker to confirm every batch",
    )


def test_batch_lost_by_the_broker_is_sent_again(redis_server, confirming_client, publisher, start_broker_worker):
    connections = make_connections(0, 60)
    record_all(confirming_client, connections)
    assert flush_within(confirming_client, FLUSH_LIMIT_SECONDS) is True
    [batch_id] = publisher.batch_ids
    assert confirming_client.stats()["unconfirmed_rows"] == len(ORGS)

    # Take the message off the queue the way a worker killed right after its
    # BRPOP does: the message is gone and was never recorded as unacknowledged.
    with redis_server.client() as client:
        removed = client.rpop(publisher.queue)
        assert client.hlen(UNACKED_KEY) == 0
    assert json.loads(removed)["headers"]["id"] == batch_id

    worker = start_broker_worker()
    flush_until_confirmed(confirming_client)

    assert set(publisher.batch_ids) == {batch_id}, "the batch must be sent again under its own id"
    assert len(publisher.batch_ids) >= 2
    assert buffer_totals() == expected_totals(connections)
    assert AppliedMessage.objects.filter(key=f"batch:{batch_id}").count() == 1
    stats = confirming_client.stats()
    assert stats["resent_messages"] >= 1
    assert stats["confirmed_messages"] == 1
    assert stats["pending_rows"] == 0
    assert received_count(worker, batch_id) >= 1


def test_lost_confirmation_resends_and_counts_once(redis_server, confirming_client, publisher, start_broker_worker):
    worker = start_broker_worker()
    connections = make_connections(0, 60)
    record_all(confirming_client, connections)
    assert flush_within(confirming_client, FLUSH_LIMIT_SECONDS) is True
    [batch_id] = publisher.batch_ids
    confirmation_key = f"{KEY_PREFIX}{batch_id}"
    with redis_server.client() as client:
        wait_until(lambda: client.exists(confirmation_key), BUFFER_WAIT_SECONDS,
                   message=f"the worker to confirm batch {batch_id}")
        # The confirmation is lost, as when Redis restarts without persistence.
        client.delete(confirmation_key)

    flush_until_confirmed(confirming_client)

    assert publisher.batch_ids.count(batch_id) >= 2
    assert redelivery_line(batch_id) in worker.log_text()
    assert buffer_totals() == expected_totals(connections)
    assert confirming_client.stats()["confirmed_messages"] == 1
    with redis_server.client() as client:
        assert not client.exists(confirmation_key), "the client deletes a confirmation once it read it"


def test_worker_confirms_task_sent_by_name(redis_server, publisher, start_broker_worker):
    start_broker_worker()
    message = {"org_id": "org-alpha", "cores": "2", "memory": "8Gi", "duration_seconds": "3.5",
               "ended_at": "2025-06-15T15:06:40Z", "connection_id": f"by-name-{uuid.uuid4()}"}
    # A message the worker rejects for good is confirmed too: sending it again would change nothing.
    malformed = {**message, "colour": "blue"}
    task_ids = [str(uuid.uuid4()), str(uuid.uuid4())]
    for task_id, kwargs in zip(task_ids, (message, malformed)):
        publisher.app.send_task("metering.record_connection_end", kwargs=kwargs, task_id=task_id,
                                queue=publisher.queue)

    confirmations = RedisConfirmations(redis_server.url, PUBLISH_TIMEOUT_SECONDS)
    confirmed = set()
    wait_until(lambda: confirmed.update(confirmations.take_confirmed(task_ids)) or confirmed == set(task_ids),
               BUFFER_WAIT_SECONDS, message="the worker to confirm both messages")
    assert buffer_totals() == {"org-alpha": Totals(16_000, 8_000, 32_000, 1)}
