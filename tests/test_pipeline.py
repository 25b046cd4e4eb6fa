"""End to end: client threads -> Redis -> a real Celery worker -> PostgreSQL -> drain -> capture server."""

import math
import random
import threading
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from fractions import Fraction

import pytest

from billing_drain import services
from billing_drain.models import DeliveredEvent
from metering.client import MeteringClient
from metering.models import UsageBucket
from tests.processes import CeleryProcess, wait_until

pytestmark = pytest.mark.integration

SIZES = [("8", "16Gi", 8, 16), ("8", "64Gi", 8, 64), ("2", "4Gi", 2, 4), ("500m", "3Gi", Fraction(1, 2), 3)]


def expected_milli(cores, memory_gib, seconds):
    """Recompute one connection's compute seconds in thousandths, independently of metering.units."""
    billed = max(1, math.ceil(Fraction(seconds)))
    exact = max(Fraction(cores), Fraction(memory_gib) / 2) * billed * 1000
    return math.floor(exact + Fraction(1, 2))


@pytest.fixture
def client(settings, worker_env):
    settings.CELERY_TASK_DEFAULT_QUEUE = worker_env["CELERY_QUEUE"]
    client = MeteringClient(
        bucket_seconds=60,
        memory_per_core_gib=2,
        max_connection_seconds=86400,
        flush_seconds=0.2,
        register_exit_flush=False,
    )
    yield client
    client.close(timeout=5)


def test_thousand_connection_ends_bill_exactly(client, start_worker, posthog_settings, capture_server):
    start_worker()
    now = datetime.now(timezone.utc)
    rng = random.Random(7)
    work = []
    for index in range(1000):
        org = f"org-{index % 50}"
        cores, memory, cores_value, memory_gib = SIZES[index % len(SIZES)]
        seconds = f"{rng.randint(0, 600)}.{rng.randint(0, 999):03d}"
        ended_at = now - timedelta(minutes=rng.randint(3, 6), seconds=rng.randint(0, 59))
        work.append((org, cores, memory, ended_at, seconds, expected_milli(cores_value, memory_gib, seconds)))
    expected = defaultdict(int)
    for org, _, _, ended_at, _, milli in work:
        bucket = int(ended_at.timestamp()) // 60 * 60
        expected[(org, bucket)] += milli

    def record(part):
        for org, cores, memory, ended_at, seconds, _ in part:
            client.record(org, cores, memory, ended_at=ended_at, duration_seconds=seconds)

    threads = [threading.Thread(target=record, args=(work[start::3],)) for start in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert client.flush() is True
    wait_until(
        lambda: sum(UsageBucket.objects.values_list("connections", flat=True)) == 1000,
        30,
        message="all 1,000 connections in the buffer",
    )

    report = services.drain()

    assert report.succeeded
    events = capture_server.events_by_uuid()
    billed = defaultdict(int)
    for event in events.values():
        key = (event["distinct_id"], int(datetime.fromisoformat(event["timestamp"]).timestamp()))
        billed[key] += event["properties"]["compute_milli"]
    assert billed == expected
    assert len(events) == len(expected)
    assert capture_server.conflicting_uuids() == set()
    assert UsageBucket.objects.count() == 0
    assert DeliveredEvent.objects.count() == len(expected)
    assert client.stats().get("invalid", 0) == 0


def test_beat_drains_on_schedule(worker_env, start_worker, tmp_path, capture_server, redis_client, settings):
    from metering import buffer
    from tests.factories import row

    buffer.apply_batch("b1", [row(org_id="acme", compute_milli=80_000), row(org_id="globex", compute_milli=320_000)])
    drain_env = {
        "POSTHOG_API_KEY": "phc_test_key",
        "POSTHOG_HOST": capture_server.url,
        "DRAIN_INTERVAL_SECONDS": "1",
        "DRAIN_LOCK_NAME": settings.DRAIN_LOCK_NAME,
    }
    start_worker(extra_env=drain_env)
    beat = CeleryProcess("beat", {**worker_env, **drain_env}, tmp_path / "beat.log").start()
    try:
        wait_until(lambda: len(capture_server.events()) == 2, 30, message="beat's drain to deliver 2 events")
    finally:
        beat.stop()

    assert {event["distinct_id"]: event["properties"]["compute_milli"] for event in capture_server.events()} == {
        "acme": 80_000,
        "globex": 320_000,
    }
    assert UsageBucket.objects.count() == 0
    assert DeliveredEvent.objects.count() == 2


def test_task_by_name_counts_connection_once(worker_env, start_worker):
    from settings.celery import app

    worker = start_worker()
    message = {
        "org_id": "umbrella",
        "cores": "500m",
        "memory": "3Gi",
        "started_at": "2026-12-04T19:29:00.000Z",
        "ended_at": "2026-12-04T19:30:01.500+00:00",
        "end_reason": "idle_reap",
        "connection_id": "go-control-plane:4711",
    }
    for _ in range(2):
        app.send_task("metering.record_connection_end", kwargs=message, queue=worker_env["CELERY_QUEUE"])

    wait_until(
        lambda: "connection go-control-plane:4711 was applied before" in worker.log_text(),
        30,
        message="the second message to be skipped",
    )
    bucket = UsageBucket.objects.get(org_id="umbrella")

    assert bucket.compute_milli == 93_000
    assert bucket.connections == 1
    assert bucket.ended_idle_reap == 1
    assert bucket.bucket_start == 1_796_412_600
