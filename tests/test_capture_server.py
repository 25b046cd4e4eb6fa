"""Tests for tests/capture_server.py, driven by the real posthog SDK's batch_post."""

from __future__ import annotations

import gzip
import json
import select
import signal
import subprocess
import sys
import time
import urllib.error
import uuid
from pathlib import Path

import pytest
import requests
from posthog.request import APIError, batch_post

from tests.capture_server import (
    EVENTS_FILE_NAME,
    REQUESTS_FILE_NAME,
    CaptureServer,
    read_jsonl,
    send_control,
)

API_KEY = "phc_test_key"
REPO_ROOT = Path(__file__).resolve().parents[1]
STANDALONE_START_TIMEOUT_SECONDS = 15


def make_event(event_uuid: str | None = None, **overrides) -> dict:
    event = {
        "event": "meter_usage",
        "distinct_id": "customer-1",
        "uuid": event_uuid or str(uuid.uuid4()),
        "timestamp": "2024-05-01T12:00:00+00:00",
        "properties": {"units": 3},
    }
    event.update(overrides)
    return event


def post(url: str, batch: list, **kwargs):
    kwargs.setdefault("timeout", 5)
    return batch_post(API_KEY, host=url, batch=batch, **kwargs)


@pytest.fixture
def server(tmp_path):
    with CaptureServer(api_key=API_KEY, data_dir=tmp_path / "capture") as capture:
        yield capture


def test_accepted_batch_is_recorded(server):
    batch = [make_event(), make_event(distinct_id=42)]

    response = post(server.url, batch)

    assert response.status_code == 200
    assert server.events() == batch
    [record] = server.requests()
    assert record.status == 200
    assert record.path == "/batch/"
    assert record.event_count == 2
    assert record.body_bytes > 0
    assert record.content_encoding is None
    assert read_jsonl(server.data_dir / EVENTS_FILE_NAME) == batch
    assert read_jsonl(server.data_dir / REQUESTS_FILE_NAME) == [record.to_json()]


def test_gzip_body_is_accepted(server):
    batch = [make_event(properties={"note": "x" * 2000}) for _ in range(5)]

    post(server.url, batch, gzip=True)

    assert server.events() == batch
    [record] = server.requests()
    assert record.content_encoding == "gzip"
    # The body size is the compressed size as sent.
    assert record.body_bytes < len(json.dumps({"batch": batch}))


@pytest.mark.parametrize(
    ("status", "retry_after", "expected_retry_after"),
    [(500, None, None), (502, None, None), (503, 30, 30.0), (429, 7, 7.0)],
)
def test_injected_status_raises_api_error(server, status, retry_after, expected_retry_after):
    server.fail_next(1, status=status, retry_after=retry_after)
    batch = [make_event()]

    with pytest.raises(APIError) as raised:
        post(server.url, batch)

    assert raised.value.status == status
    assert raised.value.retry_after == expected_retry_after
    assert server.events() == []
    # One batch_post over http:// is one request: the SDK does not retry.
    assert [record.status for record in server.requests()] == [status]

    post(server.url, batch)
    assert server.events() == batch


def test_fail_next_queues_statuses_in_order(server):
    server.fail_next(1, status=502)
    server.fail_next(2, status=429, retry_after=1)
    statuses = []

    for _ in range(4):
        try:
            post(server.url, [make_event()])
            statuses.append(200)
        except APIError as error:
            statuses.append(error.status)

    assert statuses == [502, 429, 429, 200]
    assert len(server.events()) == 1


def test_body_above_max_gets_413(server):
    small_batch = [make_event()]
    large_batch = [make_event(properties={"note": "x" * 5000})]
    server.max_body_bytes = 2000

    with pytest.raises(APIError) as raised:
        post(server.url, large_batch)

    assert raised.value.status == 413
    assert "above the limit of 2000 bytes" in raised.value.message
    assert server.events() == []
    post(server.url, small_batch)
    assert server.events() == small_batch


def test_max_body_applies_to_compressed_size(server):
    batch = [make_event(properties={"note": "x" * 5000})]
    server.max_body_bytes = 2000

    post(server.url, batch, gzip=True)

    assert server.events() == batch
    assert server.requests()[0].body_bytes <= 2000


def test_poisoned_uuid_rejects_whole_batch(server):
    poisoned = make_event()
    batch = [make_event(), poisoned, make_event()]
    server.poison(poisoned["uuid"])

    with pytest.raises(APIError) as raised:
        post(server.url, batch)

    assert raised.value.status == 400
    assert "batch[1]" in raised.value.message
    assert poisoned["uuid"] in raised.value.message
    assert server.events() == []
    assert server.requests()[0].event_count == 3

    clean_batch = [event for event in batch if event is not poisoned]
    post(server.url, clean_batch)
    assert server.events() == clean_batch


def test_poison_predicate_matches_event(server):
    server.poison(lambda event: event["properties"].get("units", 0) < 0)

    with pytest.raises(APIError) as raised:
        post(server.url, [make_event(), make_event(properties={"units": -1})])

    assert raised.value.status == 400
    assert "batch[1]" in raised.value.message
    assert server.events() == []


def test_stall_causes_client_timeout(server):
    batch = [make_event()]
    server.stall_next(1, 1.5)
    started = time.monotonic()

    with pytest.raises((requests.exceptions.Timeout, requests.exceptions.ConnectionError)):
        post(server.url, batch, timeout=0.3)

    assert time.monotonic() - started < 1.5
    [record] = server.wait_for_requests(1, timeout=5)
    assert record.stalled_seconds == 1.5
    # The server still accepts the batch after the stall, although the client
    # gave up. A retry by the client would then be a duplicate.
    assert record.status == 200
    assert server.events() == batch


def test_reset_causes_connection_error(server):
    batch = [make_event()]
    server.reset_next(1)

    with pytest.raises(requests.exceptions.ConnectionError):
        post(server.url, batch)

    [record] = server.requests()
    assert record.status is None
    assert record.detail == "connection reset"
    assert server.events() == []
    post(server.url, batch)
    assert server.events() == batch


def test_duplicate_uuid_folds_to_one(server):
    event = make_event()

    post(server.url, [event])
    post(server.url, [dict(event)])

    assert len(server.events()) == 2
    assert server.events_by_uuid() == {event["uuid"]: event}
    assert len(server.events_by_dedup_key()) == 1
    assert server.conflicting_uuids() == set()


def test_uuid_with_different_content_is_conflicting(server):
    shared_uuid = str(uuid.uuid4())
    first = make_event(shared_uuid, properties={"units": 3})
    second = make_event(shared_uuid.upper(), properties={"units": 4})
    renamed = make_event(shared_uuid, event="meter_other")

    post(server.url, [first, make_event()])
    post(server.url, [second])
    post(server.url, [renamed])

    assert server.conflicting_uuids() == {shared_uuid}
    assert server.events_by_uuid()[shared_uuid] == renamed
    # The events table keys on date, event name, distinct_id and uuid together.
    keys_with_shared_uuid = [key for key in server.events_by_dedup_key() if key[3] == shared_uuid]
    assert len(keys_with_shared_uuid) == 2


@pytest.mark.parametrize(
    ("field", "value", "expected_detail"),
    [
        ("event", "", "'event'"),
        ("event", None, "'event'"),
        ("distinct_id", None, "'distinct_id'"),
        ("distinct_id", "  ", "'distinct_id'"),
        ("uuid", "not-a-uuid", "'uuid'"),
        ("uuid", None, "'uuid'"),
        ("properties", [], "'properties'"),
    ],
)
def test_invalid_event_rejects_batch(server, field, value, expected_detail):
    invalid = make_event()
    invalid[field] = value

    with pytest.raises(APIError) as raised:
        post(server.url, [make_event(), invalid])

    assert raised.value.status == 400
    assert raised.value.message.startswith("batch[1]: ")
    assert expected_detail in raised.value.message
    assert server.events() == []


def test_event_without_properties_rejected(server):
    invalid = make_event()
    del invalid["properties"]

    with pytest.raises(APIError) as raised:
        post(server.url, [invalid])

    assert raised.value.status == 400
    assert "batch[0]" in raised.value.message


def test_wrong_api_key_gets_401(server):
    with pytest.raises(APIError) as raised:
        batch_post("phc_other_key", host=server.url, batch=[make_event()], timeout=5)

    assert raised.value.status == 401
    assert server.events() == []


def test_any_api_key_accepted_by_default():
    with CaptureServer() as capture:
        batch_post("phc_anything", host=capture.url, batch=[make_event()], timeout=5)

        assert len(capture.events()) == 1


@pytest.mark.parametrize(
    ("body", "headers", "expected_detail"),
    [
        (b"{not json", {}, "not valid JSON"),
        (b'{"batch": [], "api_key": "phc_test_key"}', {}, "empty"),
        (b'{"api_key": "phc_test_key"}', {}, "no 'batch' list"),
        (b'{"batch": {}, "api_key": "phc_test_key"}', {}, "no 'batch' list"),
        (b"[1, 2]", {}, "expected an object"),
        (b'{"batch": [NaN]}', {}, "not valid JSON"),
        (b"plain text", {"Content-Encoding": "gzip"}, "invalid gzip"),
        (gzip.compress(b"{}")[:-4], {"Content-Encoding": "gzip"}, "truncated"),
        (b"{}", {"Content-Encoding": "br"}, "unsupported Content-Encoding"),
    ],
)
def test_malformed_body_gets_400(server, body, headers, expected_detail):
    # batch_post cannot send these bodies, so this uses requests directly.
    response = requests.post(server.url + "/batch/", data=body, headers=headers, timeout=5)

    assert response.status_code == 400
    assert response.json()["type"] == "validation_error"
    assert expected_detail in response.json()["detail"]
    assert server.events() == []


def test_unknown_path_gets_404(server):
    response = requests.post(server.url + "/capture/", data=b"{}", timeout=5)

    assert response.status_code == 404
    assert server.requests() == []


def test_stop_is_idempotent_and_closes_connections(tmp_path):
    never_started = CaptureServer()
    never_started.stop()
    capture = CaptureServer().start()
    url = capture.url
    # Leaves a keep-alive connection in the SDK's connection pool.
    batch_post(API_KEY, host=url, batch=[make_event()], timeout=5)

    capture.stop()
    capture.stop()

    with pytest.raises(requests.exceptions.ConnectionError):
        batch_post(API_KEY, host=url, batch=[make_event()], timeout=5)
    assert len(capture.requests()) == 1


def test_stop_interrupts_stall():
    capture = CaptureServer().start()
    capture.stall_next(1, 30)

    with pytest.raises((requests.exceptions.Timeout, requests.exceptions.ConnectionError)):
        batch_post(API_KEY, host=capture.url, batch=[make_event()], timeout=0.3)
    started = time.monotonic()
    capture.stop()

    assert time.monotonic() - started < 5
    [record] = capture.wait_for_requests(1, timeout=5)
    assert record.status is None
    assert capture.events() == []


def test_fault_arguments_are_checked(server):
    with pytest.raises(ValueError):
        server.stall_next(1, 61)
    with pytest.raises(ValueError):
        server.fail_next(1, status=200)
    with pytest.raises(ValueError):
        server.reset_next(-1)
    with pytest.raises(ValueError):
        server.poison("not-a-uuid")


def test_clear_faults_drops_pending_faults(server):
    event = make_event()
    server.fail_next(2)
    server.reset_next(1)
    server.poison(event["uuid"])
    server.max_body_bytes = 1

    server.clear_faults()

    post(server.url, [event])
    assert server.events() == [event]


def test_control_endpoint_sets_faults(server):
    send_control(server.url, "fail_next", n=1, status=429, retry_after=2)

    with pytest.raises(APIError) as raised:
        post(server.url, [make_event()])

    assert raised.value.status == 429
    assert raised.value.retry_after == 2.0

    with pytest.raises(urllib.error.HTTPError) as rejected:
        send_control(server.url, "stall_next", n=1, seconds=600)
    assert rejected.value.code == 400
    with pytest.raises(urllib.error.HTTPError):
        send_control(server.url, "explode")
    assert len(server.requests()) == 1


def start_standalone(tmp_path: Path) -> tuple[subprocess.Popen, str]:
    """Start the server as a child process and return it with the URL it printed."""
    stderr_file = open(tmp_path / "server.stderr", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.capture_server", "--port", "0",
         "--dir", str(tmp_path / "data"), "--state-file", str(tmp_path / "state.json"),
         "--api-key", API_KEY],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=stderr_file,
    )
    stderr_file.close()
    ready, _, _ = select.select([process.stdout], [], [], STANDALONE_START_TIMEOUT_SECONDS)
    if not ready:
        process.kill()
        process.wait(timeout=5)
        pytest.fail(
            f"standalone capture server printed no URL within "
            f"{STANDALONE_START_TIMEOUT_SECONDS} s. Its stderr: "
            f"{(tmp_path / 'server.stderr').read_text()}"
        )
    url = process.stdout.readline().decode().strip()
    return process, url


def test_standalone_process_records_to_files(tmp_path):
    process, url = start_standalone(tmp_path)
    try:
        assert url.startswith("http://127.0.0.1:")
        state = json.loads((tmp_path / "state.json").read_text())
        assert state["url"] == url
        assert state["pid"] == process.pid
        batch = [make_event(), make_event()]

        post(url, batch, gzip=True)
        send_control(url, "fail_next", n=1, status=503)
        with pytest.raises(APIError) as raised:
            post(url, [make_event()])

        assert raised.value.status == 503
        assert read_jsonl(tmp_path / "data" / EVENTS_FILE_NAME) == batch
        logged = read_jsonl(tmp_path / "data" / REQUESTS_FILE_NAME)
        assert [entry["status"] for entry in logged] == [200, 503]
    finally:
        process.send_signal(signal.SIGTERM)
        exit_code = process.wait(timeout=10)
        process.stdout.close()

    assert exit_code == 0


def test_standalone_events_survive_kill(tmp_path):
    process, url = start_standalone(tmp_path)
    try:
        batch = [make_event()]
        post(url, batch)
    finally:
        process.kill()
        process.wait(timeout=10)
        process.stdout.close()

    assert read_jsonl(tmp_path / "data" / EVENTS_FILE_NAME) == batch
    with pytest.raises(requests.exceptions.ConnectionError):
        post(url, batch)


def test_read_jsonl_skips_unterminated_line(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": 2}\n{"c": ')

    assert read_jsonl(path) == [{"a": 1}, {"b": 2}]
    assert read_jsonl(tmp_path / "missing.jsonl") == []
