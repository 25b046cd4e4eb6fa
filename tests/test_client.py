"""The in-process client without a broker: publishing goes to a recording function."""

import json
import os
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

from metering import client as client_module
from metering.client import MeteringClient

ENDED = datetime(2026, 12, 4, 19, 29, 38, tzinfo=timezone.utc)
BUCKET = 1_796_412_540  # ENDED rounded down to the minute, as epoch seconds


class RecordingPublisher:
    def __init__(self):
        self.batches = []
        self.failures = 0

    def __call__(self, batch_id, rows, timeout_seconds):
        if self.failures:
            self.failures -= 1
            raise ConnectionError("broker unreachable")
        self.batches.append((batch_id, rows))

    def rows(self):
        return [row for _, rows in self.batches for row in rows]


def new_client(publish, **overrides):
    options = {
        "bucket_seconds": 60,
        "memory_per_core_gib": 2,
        "max_connection_seconds": 86400,
        "flush_seconds": 60,
        "register_exit_flush": False,
        "publish": publish,
        **overrides,
    }
    return MeteringClient(**options)


def test_record_folds_per_org_bucket():
    publisher = RecordingPublisher()
    client = new_client(publisher)

    client.record("acme", "8", "16Gi", ended_at=ENDED, duration_seconds=9.2)
    client.record("acme", "8", "64Gi", ended_at=ENDED, duration_seconds=10.0, end_reason="idle_reap")
    client.record("umbrella", "500m", "3Gi", ended_at=ENDED, duration_seconds=61.5)

    assert client.flush() is True
    rows = {row["org_id"]: row for row in publisher.rows()}
    assert rows["acme"]["compute_milli"] == 400_000
    assert rows["acme"]["connections"] == 2
    assert rows["acme"]["end_reasons"] == {"client_disconnect": 1, "idle_reap": 1}
    assert rows["acme"]["bucket_start"] == BUCKET
    assert rows["umbrella"]["compute_milli"] == 93_000


def test_times_from_start_and_end():
    publisher = RecordingPublisher()
    client = new_client(publisher)

    client.record("acme", "2", "4Gi", started_at=ENDED - timedelta(seconds=2, milliseconds=1), ended_at=ENDED)

    client.flush()
    assert publisher.rows()[0]["compute_milli"] == 6_000


@pytest.mark.parametrize(
    "arguments",
    [
        pytest.param(("acme", "16GB", "1Gi"), id="bad-cores"),
        pytest.param(("acme", "2", "-1"), id="negative-memory"),
        pytest.param((None, "2", "4Gi"), id="no-org"),
        pytest.param((b"\xff\xfe", "2", "4Gi"), id="non-utf8-org"),
        pytest.param(("x" * 201, "2", "4Gi"), id="huge-org"),
        pytest.param(("acme", object(), "4Gi"), id="unhashable-size"),
        pytest.param(("acme", ["2"], "4Gi"), id="list-size"),
    ],
)
def test_bad_input_is_counted_never_raised(arguments, caplog):
    publisher = RecordingPublisher()
    client = new_client(publisher)

    client.record(*arguments, ended_at=ENDED, duration_seconds=1)
    client.record("good", "2", "4Gi", ended_at=ENDED, duration_seconds=1)

    assert client.flush() is True
    assert client.stats()["invalid"] == 1
    assert [row["org_id"] for row in publisher.rows()] == ["good"]
    assert "metering ignored a connection end" in caplog.text


def test_naive_datetime_is_rejected_with_hint(caplog):
    client = new_client(RecordingPublisher())

    client.record("acme", "2", "4Gi", ended_at=datetime(2026, 12, 4, 19, 0), duration_seconds=1)
    client.flush()

    assert client.stats()["invalid"] == 1
    assert "it has no time zone" in caplog.text


def test_unknown_end_reason_billed_as_other(caplog):
    publisher = RecordingPublisher()
    client = new_client(publisher)

    client.record("acme", "2", "4Gi", ended_at=ENDED, duration_seconds=1, end_reason="meteor")
    client.flush()

    assert publisher.rows()[0]["end_reasons"] == {"other": 1}
    assert "unknown end reason 'meteor'" in caplog.text


def test_failed_publish_keeps_batch_id():
    publisher = RecordingPublisher()
    publisher.failures = 1
    client = new_client(publisher)
    client.record("acme", "2", "4Gi", ended_at=ENDED, duration_seconds=1)

    assert client.flush() is False
    client.record("acme", "2", "4Gi", ended_at=ENDED, duration_seconds=1)
    assert client.flush() is True

    assert client.stats()["publish_failures"] == 1
    assert len(publisher.batches) == 2
    assert publisher.batches[0][1][0]["connections"] == 1
    assert publisher.batches[1][1][0]["connections"] == 1


def test_pending_keys_are_capped(caplog):
    publisher = RecordingPublisher()
    publisher.failures = 10
    client = new_client(publisher, max_pending_keys=3)

    for index in range(5):
        client.record(f"org-{index}", "2", "4Gi", ended_at=ENDED, duration_seconds=1)
    client.flush()

    assert client.stats()["dropped"] == 2
    assert client.stats()["pending_rows"] == 3
    assert "metering dropped a connection end" in caplog.text


def test_exit_flush_is_bounded_by_deadline():
    release = threading.Event()

    def hanging_publish(batch_id, rows, timeout_seconds):
        release.wait(30)

    client = new_client(hanging_publish)
    client.record("acme", "2", "4Gi", ended_at=ENDED, duration_seconds=1)

    started = time.monotonic()
    client.close(timeout=0.5)
    elapsed = time.monotonic() - started
    release.set()

    assert elapsed < 5


def test_metered_connection_records_end_reason(monkeypatch):
    publisher = RecordingPublisher()
    client = new_client(publisher)
    monkeypatch.setattr(client_module, "_default_client", client)

    with client_module.metered_connection("acme", "2", "4Gi") as connection:
        connection.end_reason = "user_error"
    with pytest.raises(RuntimeError):
        with client_module.metered_connection("acme", "2", "4Gi"):
            raise RuntimeError("connection handler failed")
    client.flush()

    [row] = publisher.rows()
    assert row["connections"] == 2
    assert row["end_reasons"] == {"user_error": 1, "other": 1}
    assert row["compute_milli"] == 4_000


def test_child_after_fork_sends_only_its_own(tmp_path):
    sent = tmp_path / "sent.jsonl"

    def publish_to_file(batch_id, rows, timeout_seconds):
        with open(sent, "a") as output:
            for row in rows:
                output.write(json.dumps({"pid": os.getpid(), "org": row["org_id"]}) + "\n")

    client = new_client(publish_to_file)
    client.record("parent-org", "2", "4Gi", ended_at=ENDED, duration_seconds=1)

    child = os.fork()
    if child == 0:
        try:
            client.record("child-org", "2", "4Gi", ended_at=ENDED, duration_seconds=1)
            client.close(timeout=5)
        finally:
            os._exit(0)
    os.waitpid(child, 0)
    client.flush()

    lines = [json.loads(line) for line in sent.read_text().splitlines()]
    assert sorted(line["org"] for line in lines) == ["child-org", "parent-org"]
    assert {line["org"]: line["pid"] for line in lines}["parent-org"] == os.getpid()
    assert {line["org"]: line["pid"] for line in lines}["child-org"] == child


def test_folding_goes_on_while_publish_backs_off():
    publisher = RecordingPublisher()
    publisher.failures = 1000
    client = new_client(publisher, flush_seconds=0.05, max_pending_connections=50)

    for round_number in range(6):
        for _ in range(40):
            client.record("acme", "2", "4Gi", ended_at=ENDED, duration_seconds=1)
        time.sleep(0.3)
    client.close(timeout=0.1)

    assert client.stats().get("dropped", 0) == 0
    assert client.stats()["recorded"] == 240
    assert client.stats()["publish_failures"] < 20


def test_queue_overflow_is_logged(caplog):
    publisher = RecordingPublisher()
    client = new_client(publisher, max_pending_connections=3)
    client._thread = threading.current_thread()  # keep the flusher from starting; the test folds itself

    for _ in range(5):
        client.record("acme", "2", "4Gi", ended_at=ENDED, duration_seconds=1)
    client.flush()

    assert client.stats()["dropped"] == 2
    assert "metering dropped 2 connection ends: 3 were queued unfolded" in caplog.text
    assert publisher.rows()[0]["connections"] == 3


class FakeConfirmations:
    """Confirmations a test grants by hand; ``failures`` makes the next reads raise."""

    def __init__(self):
        self.granted = set()
        self.failures = 0

    def take_confirmed(self, message_ids):
        if self.failures:
            self.failures -= 1
            raise ConnectionError("redis unreachable")
        confirmed = self.granted & set(message_ids)
        self.granted -= confirmed
        return confirmed


def confirming_client(publisher, confirmations, **overrides):
    return new_client(publisher, confirmations=confirmations, confirm_seconds=60, **overrides)


def test_published_batch_is_kept_until_confirmed():
    publisher = RecordingPublisher()
    confirmations = FakeConfirmations()
    client = confirming_client(publisher, confirmations)
    client.record("acme", "2", "4Gi", ended_at=ENDED, duration_seconds=1)

    assert client.flush() is True
    [(batch_id, _)] = publisher.batches
    assert client.stats()["pending_rows"] == 0
    assert client.stats()["unconfirmed_rows"] == 1

    confirmations.granted.add(batch_id)
    assert client.flush() is True
    assert client.stats()["unconfirmed_rows"] == 0
    assert client.stats()["confirmed_messages"] == 1
    assert len(publisher.batches) == 1


def test_unconfirmed_batch_is_sent_again_with_growing_waits(monkeypatch, caplog):
    now = [1000.0]
    monkeypatch.setattr(client_module.time, "monotonic", lambda: now[0])
    publisher = RecordingPublisher()
    client = confirming_client(publisher, FakeConfirmations())
    client.record("acme", "2", "4Gi", ended_at=ENDED, duration_seconds=1)
    client.flush()
    batch_id, rows = publisher.batches[0]

    sent_at = []
    for _ in range(80):
        now[0] += 30
        sent_before = len(publisher.batches)
        client.flush()
        if len(publisher.batches) > sent_before:
            sent_at.append(now[0] - 1000)

    assert [sent_batch_id for sent_batch_id, _ in publisher.batches] == [batch_id] * 6
    assert all(sent_rows == rows for _, sent_rows in publisher.batches)
    # Waits of 60, 120, 240, 480 and 600 s (the maximum) between the sends.
    assert sent_at == [60, 180, 420, 900, 1500]
    assert client.stats()["resent_messages"] == 5
    assert f"metering sends batch {batch_id} again: no worker confirmed it within 60.0 s" in caplog.text
    # After the fifth resend and a last wait the client gives up and logs an error.
    assert client.stats()["unconfirmed_given_up"] == 1
    assert client.stats()["unconfirmed_rows"] == 0
    assert f"metering gave up on batch {batch_id} (1 rows): no worker confirmed it after 6 sends" in caplog.text


def test_unreadable_confirmations_keep_batches(caplog):
    publisher = RecordingPublisher()
    confirmations = FakeConfirmations()
    client = confirming_client(publisher, confirmations)
    client.record("acme", "2", "4Gi", ended_at=ENDED, duration_seconds=1)
    client.flush()
    batch_id, _ = publisher.batches[0]

    confirmations.failures = 1
    confirmations.granted.add(batch_id)
    client.flush()
    assert client.stats()["unconfirmed_rows"] == 1
    assert "could not read which of 1 published batches workers confirmed: redis unreachable" in caplog.text

    client.flush()
    assert client.stats()["unconfirmed_rows"] == 0


def test_unconfirmed_batches_never_cause_drops(caplog):
    publisher = RecordingPublisher()
    client = confirming_client(publisher, FakeConfirmations(), max_pending_keys=2, rows_per_message=1)
    for org in ("acme", "globex", "initech", "umbrella"):
        client.record(org, "2", "4Gi", ended_at=ENDED, duration_seconds=1)
        client.flush()

    stats = client.stats()
    assert stats.get("dropped", 0) == 0
    assert len(publisher.batches) == 4
    # Only the two newest batches are still waited for.
    assert stats["unconfirmed_rows"] == 2
    assert stats["unconfirmed_released"] == 2
    assert "metering stopped waiting for a worker to confirm 1 published batches" in caplog.text


def test_exit_flush_resends_unconfirmed_batch(caplog):
    publisher = RecordingPublisher()
    confirmations = FakeConfirmations()
    client = confirming_client(publisher, confirmations)
    client.record("acme", "2", "4Gi", ended_at=ENDED, duration_seconds=1)

    started = time.monotonic()
    client.close(timeout=1.0)
    elapsed = time.monotonic() - started

    batch_ids = [batch_id for batch_id, _ in publisher.batches]
    # Sent, then once more halfway to the deadline.
    assert len(batch_ids) == 2
    assert batch_ids[0] == batch_ids[1]
    assert elapsed < 3.0
    assert "no worker confirmed 1 published batches (1 rows) within 1.0 s" in caplog.text


def test_exit_flush_returns_once_confirmed(caplog):
    publisher = RecordingPublisher()
    confirmations = FakeConfirmations()

    def publish_and_confirm(batch_id, rows, timeout_seconds):
        publisher(batch_id, rows, timeout_seconds)
        confirmations.granted.add(batch_id)

    client = confirming_client(publish_and_confirm, confirmations)
    client.record("acme", "2", "4Gi", ended_at=ENDED, duration_seconds=1)

    started = time.monotonic()
    client.close(timeout=5.0)

    assert time.monotonic() - started < 2.0
    assert len(publisher.batches) == 1
    assert client.stats()["confirmed_messages"] == 1
    assert "no worker confirmed" not in caplog.text


def test_stop_publishes_nothing_more():
    publisher = RecordingPublisher()
    client = new_client(publisher, flush_seconds=0.2)
    client.record("acme", "2", "4Gi", ended_at=ENDED, duration_seconds=1)

    assert client.stop() == 1
    time.sleep(0.6)

    assert publisher.batches == []
