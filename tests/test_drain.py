import json
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from billing_drain import sealing, services
from billing_drain.events import event_uuid
from billing_drain.lock import drain_lock
from billing_drain.models import DeliveredEvent
from billing_drain.transport import DeliveryFailed
from metering import buffer
from metering.models import UsageBucket
from metering.units import END_REASONS
from tests.factories import BUCKET, row

CLOSED = datetime.fromtimestamp(BUCKET + 90, timezone.utc)
requires_row_locks = pytest.mark.skipif(
    connection.vendor != "postgresql", reason="SQLite locks whole tables, so an increment cannot lock one row"
)


def fill(orgs=3, compute_milli=1000):
    buffer.apply_batch("fill", [row(org_id=f"org-{index}", compute_milli=compute_milli + index) for index in range(orgs)])


def billed_by_uuid(capture_server):
    return {uuid: event["properties"]["compute_milli"] for uuid, event in capture_server.events_by_uuid().items()}


@pytest.mark.django_db
def test_drain_ships_exact_event(posthog_settings, capture_server):
    buffer.apply_batch("b1", [row(org_id="hooli", compute_milli=4657, connections=1, reason="fatal_error")])

    report = services.drain(now=CLOSED)

    assert report.succeeded
    [event] = capture_server.events()
    expected_uuid = str(event_uuid("hooli", BUCKET, 1))
    assert event["uuid"] == expected_uuid
    assert event["event"] == "managed warehouse compute usage"
    assert event["distinct_id"] == "hooli"
    assert event["timestamp"] == "2025-12-04T19:29:00+00:00"
    assert event["properties"]["compute_seconds"] == 4.657
    assert event["properties"]["cpu_seconds"] == 4.657
    assert event["properties"]["memory_gib_seconds"] == 9.314
    assert event["properties"]["connections"] == 1
    assert event["properties"]["end_reasons"]["fatal_error"] == 1
    assert event["properties"]["bucket_seconds"] == 60
    assert event["properties"]["memory_per_core_gib"] == 2
    assert event["properties"]["generation"] == 1
    assert UsageBucket.objects.count() == 0
    assert DeliveredEvent.objects.get().event_uuid.hex == expected_uuid.replace("-", "")


@pytest.mark.django_db
def test_event_text_is_exact_decimal(posthog_settings, capture_server):
    buffer.apply_batch("b1", [row(compute_milli=102_288_001)])

    services.drain(now=CLOSED)

    raw = capture_server.requests()[-1]
    assert raw.status == 200
    [event] = capture_server.events()
    assert json.dumps(event["properties"]["compute_seconds"]) == "102288.001"


@pytest.mark.django_db
def test_server_errors_keep_rows_then_ship_once(posthog_settings, capture_server):
    fill(orgs=3)
    capture_server.fail_next(3, status=500)
    now = CLOSED

    for attempt in range(1, 4):
        report = services.drain(now=now)
        assert not report.succeeded
        assert report.kept_for_retry == 3
        assert UsageBucket.objects.filter(state="sealed", attempts=attempt).count() == 3
        now = UsageBucket.objects.first().next_attempt_at

    report = services.drain(now=now)

    assert report.succeeded
    assert report.delivered_events == 3
    assert len(capture_server.events()) == 3
    assert UsageBucket.objects.count() == 0
    assert DeliveredEvent.objects.count() == 3


@pytest.mark.django_db
def test_backoff_skips_rows_until_due(posthog_settings, capture_server):
    fill(orgs=1)
    capture_server.fail_next(1, status=502)
    services.drain(now=CLOSED)

    report = services.drain(now=CLOSED + timedelta(seconds=5))

    assert report.requests == 0
    assert UsageBucket.objects.get().attempts == 1


@pytest.mark.django_db
def test_retry_after_sets_next_attempt(posthog_settings, capture_server):
    fill(orgs=1)
    capture_server.fail_next(1, status=429, retry_after=600)

    services.drain(now=CLOSED)

    assert UsageBucket.objects.get().next_attempt_at == CLOSED + timedelta(seconds=600)
    assert "429" in UsageBucket.objects.get().last_error


@pytest.mark.django_db
def test_crash_after_2xx_reships_same_uuid(posthog_settings, capture_server, monkeypatch):
    fill(orgs=2)

    def crash(*args, **kwargs):
        raise SystemExit("killed between the 2xx and the delete")

    with monkeypatch.context() as patch:
        patch.setattr(services, "mark_delivered", crash)
        with pytest.raises(SystemExit):
            services.drain(now=CLOSED)
    assert UsageBucket.objects.filter(state="sealed").count() == 2

    services.drain(now=CLOSED)

    assert len(capture_server.events()) == 4
    assert len(capture_server.events_by_uuid()) == 2
    assert capture_server.conflicting_uuids() == set()
    assert DeliveredEvent.objects.count() == 2
    assert UsageBucket.objects.count() == 0


@pytest.mark.django_db
def test_late_increment_ships_under_new_uuid(posthog_settings, capture_server):
    buffer.apply_batch("b1", [row(compute_milli=1000)])
    services.drain(now=CLOSED)
    buffer.apply_batch("b2", [row(compute_milli=250)])

    services.drain(now=CLOSED)

    events = sorted(capture_server.events(), key=lambda event: event["properties"]["generation"])
    assert [event["properties"]["compute_milli"] for event in events] == [1000, 250]
    assert events[0]["uuid"] != events[1]["uuid"]
    assert events[1]["uuid"] == str(event_uuid("acme", BUCKET, 2))


@pytest.mark.django_db
def test_oversized_request_is_split(posthog_settings, capture_server):
    fill(orgs=40)
    capture_server.max_body_bytes = 1200

    report = services.drain(now=CLOSED)

    assert report.succeeded
    assert len(capture_server.events_by_uuid()) == 40
    assert any(request.status == 413 for request in capture_server.requests())
    assert UsageBucket.objects.count() == 0


@pytest.mark.django_db
def test_poisoned_event_is_parked_rest_delivered(posthog_settings, capture_server):
    fill(orgs=6)
    poisoned = str(event_uuid("org-3", BUCKET, 1))
    capture_server.poison(poisoned)

    report = services.drain(now=CLOSED)

    assert report.parked == 1
    assert report.delivered_events == 5
    assert poisoned not in capture_server.events_by_uuid()
    parked = UsageBucket.objects.get()
    assert parked.state == "rejected"
    assert parked.org_id == "org-3"
    assert "400" in parked.last_error

    capture_server.clear_faults()
    assert services.retry_parked() == 1
    assert services.drain(now=CLOSED).delivered_events == 1
    assert poisoned in capture_server.events_by_uuid()


@pytest.mark.django_db
def test_outbox_without_api_key(settings, tmp_path):
    settings.POSTHOG_API_KEY = None
    settings.METERING_OUTBOX_DIR = tmp_path / "outbox"
    fill(orgs=2)

    report = services.drain(now=CLOSED)

    [outbox] = list((tmp_path / "outbox").iterdir())
    lines = [json.loads(line) for line in outbox.read_text().splitlines()]
    assert report.destination == str(outbox)
    assert sorted(event["distinct_id"] for event in lines) == ["org-0", "org-1"]
    assert DeliveredEvent.objects.filter(destination=str(outbox)).count() == 2


@pytest.mark.django_db(transaction=True)
def test_overlapping_drains_never_double_bill(posthog_settings, capture_server):
    fill(orgs=40)
    capture_server.stall_next(1, 0.5)
    reports = []

    def run():
        try:
            reports.append(services.drain(now=CLOSED, batch_size=5))
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert sum(report.delivered_events for report in reports) == 40
    assert len(capture_server.events_by_uuid()) == 40
    assert capture_server.conflicting_uuids() == set()
    assert DeliveredEvent.objects.count() == 40
    assert sum(billed_by_uuid(capture_server).values()) == sum(1000 + index for index in range(40))


@pytest.mark.django_db(transaction=True)
def test_second_drain_skips_while_lock_held(posthog_settings, capture_server, redis_client, caplog):
    fill(orgs=1)
    holder = drain_lock()
    assert holder.acquire()
    try:
        with pytest.raises(services.DrainLockHeld) as held:
            services.drain_with_lock(now=CLOSED)
        from billing_drain.tasks import drain as drain_task

        with caplog.at_level("INFO", logger="billing_drain.tasks"):
            assert drain_task.run() is None
    finally:
        holder.release()

    assert "since" in held.value.holder
    assert "drain skipped: another drain holds the lock" in caplog.text
    assert capture_server.events() == []
    assert services.drain_with_lock(now=CLOSED).delivered_events == 1


@pytest.mark.django_db
def test_database_lock_is_exclusive(settings):
    settings.REDIS_URL = None
    settings.CELERY_BROKER_URL = "filesystem://"
    first, second = drain_lock(), drain_lock()

    assert first.acquire()
    assert not second.acquire()
    assert second.holder() is not None
    first.release()
    assert second.acquire()


@pytest.mark.django_db(transaction=True)
def test_drain_command_runs_and_reports(posthog_settings, capture_server, redis_client, capsys):
    fill(orgs=2)
    UsageBucket.objects.update(bucket_start=BUCKET - 3600)

    call_command("drain_billing", "--dry-run")
    dry = capsys.readouterr().out
    assert "Would ship to " + capture_server.url in dry
    assert "org-0" in dry
    assert "1.000" in dry
    assert capture_server.events() == []

    call_command("drain_billing", "--org", "org-1")
    real = capsys.readouterr().out
    assert "org-1" in real
    assert "1.001" in real
    assert "org-0" not in real
    assert "Drain succeeded." in real
    assert len(capture_server.events()) == 1


@pytest.mark.django_db(transaction=True)
def test_drain_command_fails_on_delivery_error(posthog_settings, capture_server, redis_client):
    fill(orgs=1)
    UsageBucket.objects.update(bucket_start=BUCKET - 3600)
    capture_server.fail_next(1, status=503)

    with pytest.raises(CommandError) as error:
        call_command("drain_billing")

    assert error.value.returncode == 1
    assert "1 events kept for retry" in str(error.value)


@pytest.mark.django_db(transaction=True)
def test_drain_command_says_lock_held(posthog_settings, redis_client):
    holder = drain_lock()
    assert holder.acquire()
    try:
        with pytest.raises(CommandError) as error:
            call_command("drain_billing")
    finally:
        holder.release()

    assert error.value.returncode == 3
    assert "Another drain is running" in str(error.value)


@pytest.mark.django_db(transaction=True)
def test_two_drains_at_once_one_skips(posthog_settings, capture_server, redis_client):
    fill(orgs=10)
    capture_server.stall_next(1, 1.0)
    outcomes = []
    start = threading.Barrier(2)

    def run():
        start.wait()
        try:
            outcomes.append(services.drain_with_lock(now=CLOSED).delivered_events)
        except services.DrainLockHeld as held:
            outcomes.append(held)
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    delivered = [outcome for outcome in outcomes if isinstance(outcome, int)]
    skipped = [outcome for outcome in outcomes if isinstance(outcome, services.DrainLockHeld)]
    assert delivered == [10]
    assert len(skipped) == 1
    assert len(capture_server.events()) == 10


@pytest.mark.django_db
def test_drain_command_says_redis_unreachable(settings):
    settings.REDIS_URL = "redis://127.0.0.1:9/0"

    with pytest.raises(CommandError) as error:
        call_command("drain_billing")

    assert "cannot reach Redis for the drain lock" in str(error.value)
    assert "Check REDIS_URL" in str(error.value)


class ScriptedTransport:
    """A transport that records each request and raises the scripted error for it, if any.

    ``stall_seconds`` delays the response to the request of that index (from 0).
    """

    destination = "scripted"

    def __init__(self, errors=None, stall_seconds=None, calls=None):
        self.errors = errors or {}
        self.stall_seconds = stall_seconds or {}
        self.calls = calls if calls is not None else []
        self.sent = []
        self.confirmed = set()
        self.finished = 0

    def send(self, events):
        index = len(self.sent)
        self.sent.append([event["distinct_id"] for event in events])
        self.calls.append("send")
        try:
            time.sleep(self.stall_seconds.get(index, 0))
            if index in self.errors:
                raise self.errors[index]
            self.confirmed.update(event["uuid"] for event in events)
        finally:
            self.finished += 1


def sealed_orgs():
    return sorted(UsageBucket.objects.filter(state="sealed").values_list("org_id", flat=True))


@pytest.mark.django_db
def test_failed_later_page_keeps_it_and_rest():
    fill(orgs=6)
    transport = ScriptedTransport(errors={1: DeliveryFailed("HTTP 503: unavailable", 503)})

    report = services.drain(now=CLOSED, transport=transport, batch_size=2)

    assert transport.sent == [["org-0", "org-1"], ["org-2", "org-3"]]
    assert report.requests == 2
    assert report.delivered_events == 2
    assert report.kept_for_retry == 4
    assert sorted(DeliveredEvent.objects.values_list("org_id", flat=True)) == ["org-0", "org-1"]
    assert sealed_orgs() == ["org-2", "org-3", "org-4", "org-5"]
    assert sorted(UsageBucket.objects.filter(attempts=1).values_list("org_id", flat=True)) == ["org-2", "org-3"]
    assert UsageBucket.objects.filter(attempts=0, next_attempt_at__isnull=True).count() == 2


@pytest.mark.django_db
def test_rows_deleted_only_after_own_response(monkeypatch):
    fill(orgs=7)
    transport = ScriptedTransport(stall_seconds={1: 0.2, 2: 0.2})
    unconfirmed_deletes = []
    original_mark_delivered = services.mark_delivered

    def checked_mark_delivered(rows, destination, report):
        unconfirmed_deletes.extend(row.org_id for row in rows if str(row.event_uuid) not in transport.confirmed)
        return original_mark_delivered(rows, destination, report)

    monkeypatch.setattr(services, "mark_delivered", checked_mark_delivered)

    report = services.drain(now=CLOSED, transport=transport, batch_size=2)

    assert unconfirmed_deletes == []
    assert report.delivered_events == 7
    assert report.requests == 4
    assert UsageBucket.objects.count() == 0


@pytest.mark.django_db
def test_lock_checked_before_each_next_request():
    fill(orgs=6)
    calls = []
    transport = ScriptedTransport(calls=calls)

    def keep_lock():
        calls.append("keep_lock")
        return True

    report = services.drain(now=CLOSED, transport=transport, batch_size=2, keep_lock=keep_lock)

    assert report.succeeded
    assert calls == ["send", "keep_lock", "send", "keep_lock", "send", "keep_lock"]


@pytest.mark.django_db
def test_lost_lock_stops_before_next_request():
    fill(orgs=6)
    transport = ScriptedTransport()

    report = services.drain(now=CLOSED, transport=transport, batch_size=2, keep_lock=lambda: False)

    assert transport.sent == [["org-0", "org-1"]]
    assert report.lock_lost
    assert report.delivered_events == 2
    assert DeliveredEvent.objects.count() == 2
    assert sealed_orgs() == ["org-2", "org-3", "org-4", "org-5"]


@pytest.mark.django_db
def test_database_error_waits_for_request_in_flight(monkeypatch):
    fill(orgs=4)
    transport = ScriptedTransport(stall_seconds={1: 0.3})

    def failing_mark_delivered(rows, destination, report):
        raise RuntimeError("database went away")

    with monkeypatch.context() as patch:
        patch.setattr(services, "mark_delivered", failing_mark_delivered)
        with pytest.raises(RuntimeError, match="database went away"):
            services.drain(now=CLOSED, transport=transport, batch_size=2)

    assert transport.finished == 2
    assert sealed_orgs() == ["org-0", "org-1", "org-2", "org-3"]
    first_uuids = set(transport.confirmed)

    retry = ScriptedTransport()
    report = services.drain(now=CLOSED, transport=retry, batch_size=2)

    assert report.delivered_events == 4
    assert retry.confirmed == first_uuids
    assert DeliveredEvent.objects.count() == 4


@pytest.mark.django_db
def test_rejected_event_on_later_page_is_parked(posthog_settings, capture_server):
    fill(orgs=6)
    poisoned = str(event_uuid("org-3", BUCKET, 1))
    capture_server.poison(poisoned)

    report = services.drain(now=CLOSED, batch_size=2)

    assert report.parked == 1
    assert report.delivered_events == 5
    # Three pages, and the rejected page split into two requests of one event.
    assert report.requests == 5
    assert set(capture_server.events_by_uuid()) == {
        str(event_uuid(f"org-{index}", BUCKET, 1)) for index in range(6) if index != 3
    }
    assert UsageBucket.objects.get().org_id == "org-3"


@pytest.mark.django_db
def test_event_carries_every_end_reason(posthog_settings, capture_server):
    reasons = {reason: index + 1 for index, reason in enumerate(END_REASONS)}
    buffer.apply_batch("b1", [row(org_id="hooli", connections=sum(reasons.values()), end_reasons=reasons)])

    services.drain(now=CLOSED)

    [event] = capture_server.events()
    assert event["properties"]["end_reasons"] == reasons
    assert DeliveredEvent.objects.get().end_reasons == reasons


@pytest.mark.django_db
def test_sealing_ahead_ships_every_chunk(monkeypatch):
    monkeypatch.setattr(sealing, "SEAL_CHUNK_ROWS", 2)
    fill(orgs=7)
    transport = ScriptedTransport()
    progress = []

    report = services.drain(now=CLOSED, transport=transport, batch_size=3, progress=lambda *args: progress.append(args))

    assert report.succeeded
    assert report.sealed == 7
    assert report.delivered_events == 7
    assert transport.sent == [["org-0", "org-1", "org-2"], ["org-3", "org-4", "org-5"], ["org-6"]]
    assert progress == [(3, 7), (6, 7), (7, 7)]
    assert UsageBucket.objects.count() == 0


@pytest.mark.django_db
def test_failed_drain_still_seals_every_bucket(monkeypatch):
    monkeypatch.setattr(sealing, "SEAL_CHUNK_ROWS", 2)
    fill(orgs=6)
    transport = ScriptedTransport(errors={0: DeliveryFailed("HTTP 500: boom", 500)})

    report = services.drain(now=CLOSED, transport=transport, batch_size=2)

    assert transport.sent == [["org-0", "org-1"]]
    assert report.sealed == 6
    assert report.kept_for_retry == 6
    assert sealed_orgs() == [f"org-{index}" for index in range(6)]


@pytest.mark.django_db
def test_lost_lock_still_seals_every_bucket(monkeypatch):
    monkeypatch.setattr(sealing, "SEAL_CHUNK_ROWS", 2)
    fill(orgs=6)

    report = services.drain(now=CLOSED, transport=ScriptedTransport(), batch_size=2, keep_lock=lambda: False)

    assert report.lock_lost
    assert report.sealed == 6
    assert sealed_orgs() == ["org-2", "org-3", "org-4", "org-5"]


@requires_row_locks
@pytest.mark.django_db(transaction=True)
def test_row_sealed_behind_pages_ships_same_drain(monkeypatch, lock_row):
    monkeypatch.setattr(sealing, "SEAL_CHUNK_ROWS", 2)
    fill(orgs=6)
    row_lock = lock_row(UsageBucket.objects.get(org_id="org-0").id)

    class ReleasingTransport(ScriptedTransport):
        def send(self, events):
            # The first response comes once the increment's lock is gone, so
            # a later chunk seals org-0 after the pages passed its id.
            row_lock.release()
            super().send(events)

    transport = ReleasingTransport()
    report = services.drain(now=CLOSED, transport=transport, batch_size=2)

    assert report.succeeded
    assert report.sealed == 6
    assert report.delivered_events == 6
    assert transport.sent[0] == ["org-1", "org-2"]
    assert transport.sent[-1] == ["org-0"]
    assert UsageBucket.objects.count() == 0
