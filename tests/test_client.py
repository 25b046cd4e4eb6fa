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
