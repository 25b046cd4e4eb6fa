"""Local stand-in for PostHog's capture API, for tests that ship events with the real SDK.

``CaptureServer`` serves ``POST /batch/`` (and ``/batch``) the way
``posthog.request.batch_post`` expects. The SDK sends a JSON body
``{"batch": [...], "api_key": ..., "sent_at": ...}``, gzip-compressed with
``Content-Encoding: gzip`` when called with ``gzip=True``. It treats only status 200
as success and raises ``posthog.request.APIError(status, detail, retry_after)`` for
any other status, taking ``retry_after`` from the ``Retry-After`` header.

It listens on 127.0.0.1 only, with a port chosen by the OS unless one is given. It
speaks HTTP/1.1 with keep-alive, like a real ingestion endpoint, and ``stop()``
closes the connections that are still open.

No retries over plain HTTP: in posthog 7.91.1, ``posthog/request.py``
``_build_session`` mounts its ``Retry(total=2, connect=2, read=2)`` adapter for
``https://`` only. A ``http://`` URL goes through requests' default adapter, which
has ``DEFAULT_RETRIES = 0``. So each ``batch_post`` call against this server is
exactly one HTTP request, and a timeout, reset or error status reaches the caller
unretried. ``tests/test_capture_server.py`` checks this against the request log.

Checks on a capture request, in this order
--------------------------------------------
1. Injected faults (below), which model an outage in front of the endpoint.
2. 413 when the body as sent, before any decompression, is above
   ``max_body_bytes``. A body above ``READ_LIMIT_BYTES`` always gets 413 and the
   connection is closed without reading the body.
3. 400 when the body cannot be decompressed, is not UTF-8 JSON, is not an object,
   has no ``batch`` list, or has an empty ``batch``. JSON's non-standard
   ``NaN``/``Infinity`` tokens are rejected, as strict parsers do.
4. 401 when ``api_key`` is missing or empty, or differs from the configured key.
   With ``api_key=None`` any non-empty key is accepted.
5. 400 for the whole batch when one event is invalid. Each event needs ``event``
   (non-empty string), ``distinct_id`` (non-empty string or a number), ``uuid``
   (a string that ``uuid.UUID`` parses) and ``properties`` (an object). Real
   capture generates a missing ``uuid``, but this server requires it because
   deduplication of billed events depends on it.
6. 400 when the batch contains a poisoned event.

Every 4xx and 5xx body is JSON ``{"type": ..., "code": ..., "detail": ...}`` and
``detail`` names the event index where one event is at fault (``batch[3]: ...``).
A batch that passes gets 200 ``{"status": 1}``.

Recording
---------
Every capture request goes into the request log (``requests()``), with the status
code sent, or ``None`` when the connection was closed without a response. The
events of a batch that gets 200 go into the event log (``events()``) before the
response is written. So a client that times out or is disconnected after that
point has been counted, which is the situation that makes clients send
duplicates. With ``data_dir`` set, the same records are
appended as JSON lines to ``events.jsonl`` (one event per line, exactly as
received) and ``requests.jsonl`` in that directory. Each batch is written with one
``write`` and flushed, so the lines survive a killed process. A reader should
still skip an unterminated last line, as ``read_jsonl`` does.

Faults
------
Each fault call queues entries, and each capture request takes at most one
pending entry of each kind:

* ``stall_next(n, seconds)``: sleep before answering, at most
  ``MAX_STALL_SECONDS``. ``stop()`` cuts a stall short and then closes the
  connection without a response.
* ``reset_next(n)``: read the request, then close the connection with no response
  (SO_LINGER 0, so the client gets a TCP reset). Requests sees a
  ``ConnectionError``.
* ``fail_next(n, status=500, retry_after=None)``: answer ``status`` with an
  optional ``Retry-After`` header, and record no events.

A stall combines with a reset or a failure. A request with both a reset and a
failure pending takes only the reset. ``max_body_bytes`` and ``poison(...)`` stay in
force until changed or cleared. ``clear_faults()`` drops all of them.

Standalone process
------------------
``python -m tests.capture_server --port 0 --dir DIR [--state-file PATH]`` prints
the server URL as the first line of stdout and then serves until SIGTERM or
SIGINT. The events are read from ``DIR/events.jsonl``. ``--state-file`` gets a JSON
object with ``url``, ``pid``, ``dir``, ``events_file`` and ``requests_file`` once
the server listens, before the URL line is printed. Without ``--dir``, the
directory of ``--state-file`` is used, and without either, a new temporary
directory, which is logged.

Faults are set on a running process with ``POST /_control`` and a JSON object
(``send_control`` does this). The control endpoint accepts only loopback
clients, and its requests are neither logged as captures nor subject to faults:

* ``{"action": "fail_next", "n": 2, "status": 429, "retry_after": 3}``
* ``{"action": "stall_next", "n": 1, "seconds": 5}``
* ``{"action": "reset_next", "n": 1}``
* ``{"action": "set_max_body_bytes", "max_body_bytes": 1000}``, where ``null``
  removes the limit
* ``{"action": "poison", "uuid": "..."}`` (a predicate can only be set in-process)
* ``{"action": "clear_faults"}``

It responds 200 ``{"status": "ok"}``, or 400 with a ``detail`` for an invalid command.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import urllib.request
import uuid as uuid_module
import zlib
from collections import deque
from datetime import date, datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Optional, Union
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

LOOPBACK_HOST = "127.0.0.1"
CAPTURE_PATHS = frozenset({"/batch/", "/batch"})
CONTROL_PATH = "/_control"
EVENTS_FILE_NAME = "events.jsonl"
REQUESTS_FILE_NAME = "requests.jsonl"
MAX_STALL_SECONDS = 60.0
# Bodies larger than this are not read at all, and neither raw nor decompressed
# bodies may exceed it. It only bounds memory in this test server.
READ_LIMIT_BYTES = 64 * 1024 * 1024

EventPredicate = Callable[[dict], bool]


@dataclasses.dataclass(frozen=True)
class RequestRecord:
    """One capture request and the server's response to it."""

    index: int
    """Position in the request log, starting at 0."""
    method: str
    path: str
    status: Optional[int]
    """Status code sent, or None when the connection was closed without a response."""
    event_count: Optional[int]
    """Events in the batch, or None when the body did not parse into a batch."""
    body_bytes: int
    """Body size as sent, before decompression."""
    content_encoding: Optional[str]
    stalled_seconds: float
    detail: str
    """Why the request got its status, such as ``accepted`` or a validation error."""

    def to_json(self) -> dict:
        """Return the record as a JSON-serializable dict."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class _Reply:
    status: int
    payload: dict
    headers: dict = dataclasses.field(default_factory=dict)
    event_count: Optional[int] = None
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class _FailFault:
    status: int
    retry_after: Union[float, str, None]


def _error_reply(
    status: int, error_type: str, code: str, detail: str, event_count: Optional[int] = None
) -> _Reply:
    payload = {"type": error_type, "code": code, "detail": detail}
    return _Reply(status, payload, event_count=event_count, detail=detail)


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _reject_json_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _canonical_uuid(value: Any) -> Optional[str]:
    """Return the lowercase hyphenated form of a UUID string, or None if invalid."""
    if not isinstance(value, str):
        return None
    try:
        return str(uuid_module.UUID(value))
    except ValueError:
        return None


def _validate_event(event: Any) -> Optional[str]:
    """Return why an event is invalid, or None when it is valid."""
    if not isinstance(event, dict):
        return f"event is a {type(event).__name__}, expected an object"

    name = event.get("event")
    if not isinstance(name, str) or not name:
        return "missing or empty 'event' (expected a non-empty string)"

    distinct_id = event.get("distinct_id")
    if isinstance(distinct_id, bool) or not isinstance(distinct_id, (str, int, float)):
        return "missing or invalid 'distinct_id' (expected a string or number)"
    if isinstance(distinct_id, str) and not distinct_id.strip():
        return "empty 'distinct_id'"

    if _canonical_uuid(event.get("uuid")) is None:
        return f"missing or invalid 'uuid': {event.get('uuid')!r}"

    if not isinstance(event.get("properties"), dict):
        return "missing or invalid 'properties' (expected an object)"

    return None


def _event_date(event: dict) -> Optional[date]:
    """Return the UTC date of the event's ``timestamp``, or None when it has none."""
    timestamp = event.get("timestamp")
    if not isinstance(timestamp, str):
        return None
    try:
        parsed = datetime.fromisoformat(timestamp)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc).date()


def _decompress(body: bytes, content_encoding: str) -> Union[bytes, _Reply]:
    """Return the decompressed body, or the error reply for an unusable encoding."""
    if content_encoding in ("", "identity"):
        return body
    if content_encoding != "gzip":
        return _error_reply(
            400, "validation_error", "unsupported_encoding",
            f"unsupported Content-Encoding {content_encoding!r} (expected gzip or none)",
        )

    # wbits=31 selects the gzip container. max_length bounds the output so a small
    # compressed body cannot expand without limit.
    decompressor = zlib.decompressobj(wbits=31)
    try:
        data = decompressor.decompress(body, READ_LIMIT_BYTES + 1)
    except zlib.error as exc:
        return _error_reply(
            400, "validation_error", "invalid_gzip", f"invalid gzip body: {exc}"
        )
    if len(data) > READ_LIMIT_BYTES:
        return _error_reply(
            413, "invalid_request", "payload_too_large",
            f"decompressed body is above the read limit of {READ_LIMIT_BYTES} bytes",
        )
    if not decompressor.eof:
        return _error_reply(
            400, "validation_error", "invalid_gzip", "invalid gzip body: truncated stream"
        )
    return data


def _parse_batch(data: bytes) -> Union[tuple[dict, list], _Reply]:
    """Return the payload and its batch list, or the error reply for a bad body."""
    try:
        payload = json.loads(data.decode("utf-8"), parse_constant=_reject_json_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        return _error_reply(
            400, "validation_error", "invalid_payload", f"body is not valid JSON: {exc}"
        )
    if not isinstance(payload, dict):
        return _error_reply(
            400, "validation_error", "invalid_payload",
            f"body is a JSON {type(payload).__name__}, expected an object",
        )
    batch = payload.get("batch")
    if not isinstance(batch, list):
        return _error_reply(
            400, "validation_error", "invalid_payload",
            "body has no 'batch' list",
        )
    if not batch:
        return _error_reply(
            400, "validation_error", "empty_batch", "'batch' is empty", event_count=0
        )
    return payload, batch


class CaptureServer:
    """HTTP server on 127.0.0.1 that accepts PostHog batch requests and records them.

    All accessors and fault controls are thread-safe. See the module docstring for
    the validation order, the fault semantics and the standalone process.
    """

    def __init__(
        self,
        *,
        port: int = 0,
        api_key: Optional[str] = None,
        max_body_bytes: Optional[int] = None,
        data_dir: Union[str, os.PathLike, None] = None,
    ) -> None:
        """Configure the server without binding it. ``start()`` binds and serves.

        ``api_key``: the key every request must carry, or None to accept any
        non-empty key. ``max_body_bytes``: the limit on the body as sent, or None.
        ``data_dir``: where ``events.jsonl`` and ``requests.jsonl`` are appended,
        or None to keep records in memory only.
        """
        self._requested_port = port
        self._api_key = api_key
        self._data_dir = Path(data_dir) if data_dir is not None else None

        self._lock = threading.Lock()
        self._records_changed = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._max_body_bytes: Optional[int] = None
        self.max_body_bytes = max_body_bytes

        self._events: list[dict] = []
        self._requests: list[RequestRecord] = []
        self._latest_by_uuid: dict[str, dict] = {}
        self._conflicting_uuids: set[str] = set()

        self._pending_stalls: deque[float] = deque()
        self._pending_resets = 0
        self._pending_failures: deque[_FailFault] = deque()
        self._poisoned_uuids: set[str] = set()
        self._poison_predicates: list[EventPredicate] = []

        self._httpd: Optional[_CaptureHTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self._open_connections: set[socket.socket] = set()
        self._events_file = None
        self._requests_file = None

    # Lifecycle

    def start(self) -> "CaptureServer":
        """Bind 127.0.0.1, open the data files and serve in a daemon thread."""
        if self._httpd is not None:
            raise RuntimeError(f"capture server already started at {self.url}")
        if self._stopping.is_set():
            raise RuntimeError("capture server was stopped and cannot be restarted")

        if self._data_dir is not None:
            self._data_dir.mkdir(parents=True, exist_ok=True)
            self._events_file = open(self._data_dir / EVENTS_FILE_NAME, "ab")
            self._requests_file = open(self._data_dir / REQUESTS_FILE_NAME, "ab")

        self._httpd = _CaptureHTTPServer((LOOPBACK_HOST, self._requested_port), self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            # shutdown() waits up to one poll interval, which adds to every test teardown.
            kwargs={"poll_interval": 0.02},
            name=f"capture-server-{self.port}",
            daemon=True,
        )
        self._thread.start()
        logger.info("capture server listening at %s (data_dir=%s)", self.url, self._data_dir)
        return self

    def stop(self) -> None:
        """Stop serving and close open connections and files. Safe to call repeatedly."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        httpd = self._httpd
        if httpd is None:
            return

        try:
            httpd.shutdown()
            with self._lock:
                connections = list(self._open_connections)
            for connection in connections:
                # Wakes handler threads blocked on reading a keep-alive connection.
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            httpd.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)
        except Exception:
            logger.exception("capture server at %s failed to stop cleanly", self.url)

        with self._lock:
            for data_file in (self._events_file, self._requests_file):
                if data_file is not None:
                    try:
                        data_file.close()
                    except OSError:
                        logger.exception("failed to close %s", data_file.name)
            self._events_file = None
            self._requests_file = None
        logger.info("capture server at %s stopped", self.url)

    def __enter__(self) -> "CaptureServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """TCP port the server is bound to."""
        if self._httpd is None:
            raise RuntimeError("capture server is not started")
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        """Base URL to pass as ``host`` to the SDK, such as ``http://127.0.0.1:8123``."""
        return f"http://{LOOPBACK_HOST}:{self.port}"

    @property
    def data_dir(self) -> Optional[Path]:
        """Directory that contains ``events.jsonl`` and ``requests.jsonl``, if any."""
        return self._data_dir

    # Recorded data

    def events(self) -> list[dict]:
        """Return copies of all accepted events in arrival order, duplicates included."""
        with self._lock:
            return copy.deepcopy(self._events)

    def events_by_uuid(self) -> dict[str, dict]:
        """Return the accepted events folded by UUID, the last arrival winning.

        Keys are the canonical lowercase form of the UUID. PostHog's events table
        (a ReplacingMergeTree) keeps the latest insert per sorting key, but that key
        also contains the event date, name and distinct_id. ``events_by_dedup_key``
        folds by the full key.
        """
        with self._lock:
            return copy.deepcopy(self._latest_by_uuid)

    def events_by_dedup_key(self) -> dict[tuple, dict]:
        """Return the accepted events folded by PostHog's events-table sorting key.

        PostHog's ``sharded_events`` table is a ReplacingMergeTree ordered by
        ``(team_id, toDate(timestamp), event, cityHash64(distinct_id), cityHash64(uuid))``.
        One server is one team, so the key here is
        ``(utc_date, event, str(distinct_id), uuid)``, the last arrival winning.
        """
        folded: dict[tuple, dict] = {}
        for event in self.events():
            # NOTE: real ingestion fills a missing or unparseable timestamp from
            # the time it receives the event. Here such events get the date None.
            key = (
                _event_date(event),
                event["event"],
                str(event["distinct_id"]),
                _canonical_uuid(event["uuid"]),
            )
            folded[key] = event
        return folded

    def conflicting_uuids(self) -> set[str]:
        """Return the UUIDs that were accepted more than once with different content."""
        with self._lock:
            return set(self._conflicting_uuids)

    def requests(self) -> list[RequestRecord]:
        """Return the capture request log in the order the server responded."""
        with self._lock:
            return list(self._requests)

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> list[RequestRecord]:
        """Wait until the request log has at least ``count`` entries and return it.

        Raises TimeoutError when ``timeout`` seconds pass first. Useful after a
        client timeout, because a stalled request is logged only when it ends.
        """
        deadline = time.monotonic() + timeout
        with self._records_changed:
            while len(self._requests) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"capture server logged {len(self._requests)} requests "
                        f"within {timeout} s, expected at least {count}"
                    )
                self._records_changed.wait(remaining)
            return list(self._requests)

    # Fault controls

    def fail_next(
        self, n: int, status: int = 500, retry_after: Union[float, str, None] = None
    ) -> None:
        """Queue ``n`` requests to get ``status`` as response, with their events dropped.

        ``retry_after`` becomes the ``Retry-After`` header: seconds, or an HTTP date string.
        """
        _check_count(n)
        if not 400 <= status <= 599:
            raise ValueError(f"fail_next status must be between 400 and 599, got {status}")
        with self._lock:
            self._pending_failures.extend([_FailFault(status, retry_after)] * n)

    def stall_next(self, n: int, seconds: float) -> None:
        """Queue ``n`` requests to wait ``seconds`` (at most 60) before the response."""
        _check_count(n)
        if not 0 <= seconds <= MAX_STALL_SECONDS:
            raise ValueError(
                f"stall seconds must be between 0 and {MAX_STALL_SECONDS}, got {seconds}"
            )
        with self._lock:
            self._pending_stalls.extend([float(seconds)] * n)

    def reset_next(self, n: int) -> None:
        """Queue ``n`` requests to have their connection closed without a response."""
        _check_count(n)
        with self._lock:
            self._pending_resets += n

    @property
    def max_body_bytes(self) -> Optional[int]:
        """Largest body accepted as sent (compressed when gzipped), or None for no limit."""
        with self._lock:
            return self._max_body_bytes

    @max_body_bytes.setter
    def max_body_bytes(self, value: Optional[int]) -> None:
        valid = value is None or (
            isinstance(value, int) and not isinstance(value, bool) and value >= 0
        )
        if not valid:
            raise ValueError(
                f"max_body_bytes must be a non-negative int or None, got {value!r}"
            )
        with self._lock:
            self._max_body_bytes = value

    def poison(self, target: Union[str, EventPredicate]) -> None:
        """Reject every batch that contains a matching event with 400.

        ``target`` is an event UUID or a predicate called with each event dict. A
        predicate that raises makes the server respond with 500.
        """
        if callable(target):
            with self._lock:
                self._poison_predicates.append(target)
            return
        canonical = _canonical_uuid(target)
        if canonical is None:
            raise ValueError(f"poison target must be a UUID string or a callable, got {target!r}")
        with self._lock:
            self._poisoned_uuids.add(canonical)

    def clear_faults(self) -> None:
        """Drop queued faults, poisoned events and the body size limit."""
        with self._lock:
            self._pending_stalls.clear()
            self._pending_resets = 0
            self._pending_failures.clear()
            self._poisoned_uuids.clear()
            self._poison_predicates.clear()
            self._max_body_bytes = None

    def apply_control(self, command: dict) -> None:
        """Apply one ``POST /_control`` command, raising ValueError when it is invalid."""
        if not isinstance(command, dict):
            raise ValueError("control command must be a JSON object")
        action = command.get("action")
        try:
            if action == "fail_next":
                self.fail_next(
                    int(command["n"]),
                    status=int(command.get("status", 500)),
                    retry_after=command.get("retry_after"),
                )
            elif action == "stall_next":
                self.stall_next(int(command["n"]), float(command["seconds"]))
            elif action == "reset_next":
                self.reset_next(int(command["n"]))
            elif action == "set_max_body_bytes":
                self.max_body_bytes = command["max_body_bytes"]
            elif action == "poison":
                self.poison(str(command["uuid"]))
            elif action == "clear_faults":
                self.clear_faults()
            else:
                raise ValueError(f"unknown control action {action!r}")
        except KeyError as exc:
            missing = exc.args[0]
            raise ValueError(f"control action {action!r} is missing field {missing!r}") from None
        except TypeError as exc:
            raise ValueError(f"invalid field in control action {action!r}: {exc}") from None
        logger.info("capture server at %s applied control command %s", self.url, command)

    # Request handling, called from handler threads

    def _take_faults(self) -> tuple[float, bool, Optional[_FailFault]]:
        """Pop the faults for one capture request: stall seconds, reset, failure."""
        with self._lock:
            stall = self._pending_stalls.popleft() if self._pending_stalls else 0.0
            if self._pending_resets:
                self._pending_resets -= 1
                return stall, True, None
            failure = self._pending_failures.popleft() if self._pending_failures else None
            return stall, False, failure

    def _wait_stall(self, seconds: float) -> bool:
        """Sleep for a stall and return False when ``stop()`` interrupted it."""
        return not self._stopping.wait(seconds)

    def _evaluate_batch(self, body: bytes, content_encoding: str) -> _Reply:
        """Validate a capture body and record its events when it is accepted."""
        max_body_bytes = self.max_body_bytes
        if max_body_bytes is not None and len(body) > max_body_bytes:
            return _error_reply(
                413, "invalid_request", "payload_too_large",
                f"request body is {len(body)} bytes, above the limit of {max_body_bytes} bytes",
            )

        data = _decompress(body, content_encoding)
        if isinstance(data, _Reply):
            return data
        parsed = _parse_batch(data)
        if isinstance(parsed, _Reply):
            return parsed
        payload, batch = parsed

        api_key = payload.get("api_key")
        if not isinstance(api_key, str) or not api_key:
            return _error_reply(
                401, "authentication_error", "invalid_api_key",
                "missing 'api_key' in the request body", event_count=len(batch),
            )
        if self._api_key is not None and api_key != self._api_key:
            return _error_reply(
                401, "authentication_error", "invalid_api_key",
                "'api_key' does not match the key this server was started with",
                event_count=len(batch),
            )

        for index, event in enumerate(batch):
            problem = _validate_event(event)
            if problem is not None:
                return _error_reply(
                    400, "validation_error", "invalid_event",
                    f"batch[{index}]: {problem}", event_count=len(batch),
                )

        poisoned = self._find_poisoned(batch)
        if isinstance(poisoned, _Reply):
            return poisoned

        self._record_events(batch)
        return _Reply(200, {"status": 1}, event_count=len(batch), detail="accepted")

    def _find_poisoned(self, batch: list) -> Optional[_Reply]:
        with self._lock:
            poisoned_uuids = set(self._poisoned_uuids)
            predicates = list(self._poison_predicates)

        for index, event in enumerate(batch):
            event_uuid = _canonical_uuid(event["uuid"])
            try:
                matched = event_uuid in poisoned_uuids or any(
                    predicate(event) for predicate in predicates
                )
            except Exception as exc:
                logger.exception("poison predicate raised on batch[%d]", index)
                return _error_reply(
                    500, "server_error", "poison_predicate_failed",
                    f"poison predicate raised on batch[{index}]: {exc!r}",
                    event_count=len(batch),
                )
            if matched:
                return _error_reply(
                    400, "validation_error", "poisoned_event",
                    f"batch[{index}]: event {event_uuid} is poisoned", event_count=len(batch),
                )
        return None

    def _record_events(self, batch: list) -> None:
        lines = b"".join(
            json.dumps(event, separators=(",", ":")).encode("utf-8") + b"\n" for event in batch
        )
        with self._lock:
            for event in batch:
                key = _canonical_uuid(event["uuid"])
                previous = self._latest_by_uuid.get(key)
                if previous is not None and _canonical_json(previous) != _canonical_json(event):
                    self._conflicting_uuids.add(key)
                self._latest_by_uuid[key] = event
                self._events.append(event)
            if self._events_file is not None:
                self._events_file.write(lines)
                self._events_file.flush()

    def _record_request(self, **fields: Any) -> RequestRecord:
        with self._records_changed:
            record = RequestRecord(index=len(self._requests), **fields)
            self._requests.append(record)
            if self._requests_file is not None:
                self._requests_file.write(json.dumps(record.to_json()).encode("utf-8") + b"\n")
                self._requests_file.flush()
            self._records_changed.notify_all()
        return record

    def _track_connection(self, connection: socket.socket, is_open: bool) -> None:
        with self._lock:
            if is_open:
                self._open_connections.add(connection)
            else:
                self._open_connections.discard(connection)


def _check_count(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"fault count must be a non-negative int, got {n!r}")


class _CaptureHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], capture: CaptureServer) -> None:
        self.capture = capture
        super().__init__(address, _CaptureRequestHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            # A client that timed out or was reset closes its end, so the next
            # read or write on that connection fails. That is expected here.
            logger.debug("connection from %s ended: %r", client_address, exc)
            return
        logger.exception("capture server failed to handle a request from %s", client_address)


class _CaptureRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # The response goes out in two writes (headers, body). With Nagle's
    # algorithm on, the second waits for the client's delayed ACK, about 40 ms.
    disable_nagle_algorithm = True
    server: _CaptureHTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.capture._track_connection(self.connection, is_open=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.capture._track_connection(self.connection, is_open=False)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s - %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._reject_method()

    def do_PUT(self) -> None:
        self._reject_method()

    def do_DELETE(self) -> None:
        self._reject_method()

    def do_POST(self) -> None:
        capture = self.server.capture
        path = urlsplit(self.path).path
        content_encoding = self.headers.get("Content-Encoding", "").strip().lower()

        body_bytes = self._content_length()
        if body_bytes is None:
            return
        if body_bytes > READ_LIMIT_BYTES:
            detail = (
                f"request body is {body_bytes} bytes, "
                f"above the read limit of {READ_LIMIT_BYTES} bytes"
            )
            reply = _error_reply(413, "invalid_request", "payload_too_large", detail)
            logger.info("rejected request to %s with 413: %s", path, detail)
            if path in CAPTURE_PATHS:
                self._log_capture(path, reply, body_bytes, content_encoding, 0.0)
            self._send_reply(reply, close=True)
            return
        body = self.rfile.read(body_bytes)

        if path == CONTROL_PATH:
            self._handle_control(body)
            return
        if path not in CAPTURE_PATHS:
            reply = _error_reply(404, "invalid_request", "not_found", f"no endpoint at {path}")
            logger.info("rejected POST to unknown path %s with 404", path)
            self._send_reply(reply)
            return

        stall_seconds, reset, failure = capture._take_faults()
        if stall_seconds:
            logger.info("stalling capture request for %.3f s", stall_seconds)
            if not capture._wait_stall(stall_seconds):
                logger.info("server stopping, closing a stalled request without a response")
                self._log_capture(path, None, body_bytes, content_encoding, stall_seconds,
                                  detail="stopped during stall")
                self._abort_connection()
                return

        if reset:
            logger.info("resetting capture request connection without a response")
            self._log_capture(path, None, body_bytes, content_encoding, stall_seconds,
                              detail="connection reset")
            self._abort_connection()
            return

        if failure is not None:
            reply = _error_reply(
                failure.status, "server_error" if failure.status >= 500 else "client_error",
                "injected_fault", f"injected fault: status {failure.status}",
            )
            if failure.retry_after is not None:
                reply.headers["Retry-After"] = str(failure.retry_after)
            logger.info("answering capture request with injected status %d", failure.status)
        else:
            reply = capture._evaluate_batch(body, content_encoding)
            if reply.status != 200:
                logger.info("rejected capture request with %d: %s", reply.status, reply.detail)

        self._log_capture(path, reply, body_bytes, content_encoding, stall_seconds)
        self._send_reply(reply)

    def _content_length(self) -> Optional[int]:
        """Return the Content-Length, or send the error response and return None."""
        header = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding") or header is None:
            reply = _error_reply(411, "invalid_request", "length_required",
                                 "Content-Length is required, chunked bodies are not supported")
            logger.info("rejected request to %s with 411: no Content-Length", self.path)
            self._send_reply(reply, close=True)
            return None
        try:
            length = int(header)
        except ValueError:
            length = -1
        if length < 0:
            reply = _error_reply(400, "invalid_request", "invalid_content_length",
                                 f"invalid Content-Length {header!r}")
            logger.info("rejected request to %s with 400: %s", self.path, reply.detail)
            self._send_reply(reply, close=True)
            return None
        return length

    def _handle_control(self, body: bytes) -> None:
        if not self.client_address[0].startswith("127."):
            logger.warning("rejected control request from %s", self.client_address[0])
            self._send_reply(_error_reply(403, "invalid_request", "forbidden",
                                          "control endpoint accepts loopback clients only"))
            return
        try:
            command = json.loads(body.decode("utf-8"))
            self.server.capture.apply_control(command)
        except (UnicodeDecodeError, ValueError) as exc:
            logger.warning("rejected control command %r: %s", body[:200], exc)
            self._send_reply(_error_reply(400, "validation_error", "invalid_control", str(exc)))
            return
        self._send_reply(_Reply(200, {"status": "ok"}))

    def _reject_method(self) -> None:
        # Any body must be consumed, or it would be read as the next request.
        length = self._content_length()
        if length is None:
            return
        self.rfile.read(length)
        reply = _error_reply(405, "invalid_request", "method_not_allowed",
                             f"{self.command} is not supported, use POST")
        reply.headers["Allow"] = "POST"
        logger.info("rejected %s %s with 405", self.command, self.path)
        self._send_reply(reply)

    def _log_capture(
        self,
        path: str,
        reply: Optional[_Reply],
        body_bytes: int,
        content_encoding: str,
        stalled_seconds: float,
        detail: str = "",
    ) -> None:
        self.server.capture._record_request(
            method=self.command,
            path=path,
            status=reply.status if reply is not None else None,
            event_count=reply.event_count if reply is not None else None,
            body_bytes=body_bytes,
            content_encoding=content_encoding or None,
            stalled_seconds=stalled_seconds,
            detail=detail or (reply.detail if reply is not None else ""),
        )

    def _send_reply(self, reply: _Reply, close: bool = False) -> None:
        body = json.dumps(reply.payload).encode("utf-8")
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError) as exc:
            # This is typical after a stall, when the client has already timed out.
            logger.info("client %s left before the %d response was sent: %r",
                        self.address_string(), reply.status, exc)
            self.close_connection = True

    def _abort_connection(self) -> None:
        """Close the connection with a TCP reset and no response."""
        self.close_connection = True
        try:
            self.connection.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            # The fd closes for real when finish() closes rfile and wfile.
            self.connection.close()
        except OSError as exc:
            logger.debug("failed to abort connection: %r", exc)


# Helpers for tests that run the server in another process


def read_jsonl(path: Union[str, os.PathLike]) -> list[dict]:
    """Read a JSON-lines file, skipping an unterminated last line of a killed writer.

    A missing file reads as empty, since the server creates it on start.
    """
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    complete, _, _unterminated = raw.rpartition(b"\n")
    return [json.loads(line) for line in complete.split(b"\n") if line.strip()]


def send_control(url: str, action: str, timeout: float = 5.0, **fields: Any) -> dict:
    """Send one control command to a running server at ``url`` and return its reply.

    Raises urllib.error.HTTPError when the server rejects the command.
    """
    if urlsplit(url).hostname not in (LOOPBACK_HOST, "localhost"):
        raise ValueError(f"control URL must point at 127.0.0.1, got {url!r}")
    body = json.dumps({"action": action, **fields}).encode("utf-8")
    request = urllib.request.Request(
        url.rstrip("/") + CONTROL_PATH,
        data=body,
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


# Standalone process


def _parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.capture_server",
        description="Serve a local PostHog capture API stand-in on 127.0.0.1 until SIGTERM.",
    )
    parser.add_argument("--port", type=int, default=0,
                        help="TCP port on 127.0.0.1 (default 0: chosen by the OS)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="directory for events.jsonl and requests.jsonl (default: the "
                             "--state-file directory, else a new temporary directory)")
    parser.add_argument("--state-file", type=Path, default=None,
                        help="file to write a JSON object with url, pid and file paths "
                             "once listening")
    parser.add_argument("--api-key", default=None,
                        help="api_key that requests must carry (default: any non-empty key)")
    parser.add_argument("--max-body-bytes", type=int, default=None,
                        help="respond 413 above this body size as sent, in bytes "
                             "(default: no limit)")
    parser.add_argument("--log-level", default="INFO",
                        help="logging level for stderr (default INFO)")
    return parser.parse_args(argv)


def _write_state_file(path: Path, server: CaptureServer) -> None:
    state = {
        "url": server.url,
        "pid": os.getpid(),
        "dir": str(server.data_dir),
        "events_file": str(server.data_dir / EVENTS_FILE_NAME),
        "requests_file": str(server.data_dir / REQUESTS_FILE_NAME),
    }
    # Write then rename, so a reader never sees a half-written file.
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(state))
    os.replace(temporary, path)


def main(argv: Optional[list[str]] = None) -> int:
    """Run the server until SIGTERM or SIGINT, printing its URL as the first stdout line."""
    args = _parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )

    data_dir = args.dir
    if data_dir is None and args.state_file is not None:
        data_dir = args.state_file.resolve().parent
    if data_dir is None:
        data_dir = Path(tempfile.mkdtemp(prefix="capture-server-"))
        logger.info("no --dir given, writing records to %s", data_dir)

    server = CaptureServer(
        port=args.port,
        api_key=args.api_key,
        max_body_bytes=args.max_body_bytes,
        data_dir=data_dir,
    )
    stop_requested = threading.Event()

    def request_stop(signum: int, _frame: Any) -> None:
        logger.info("received signal %d, stopping", signum)
        stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    server.start()
    try:
        # The state file comes first, so it exists once the URL line is read.
        if args.state_file is not None:
            _write_state_file(args.state_file, server)
        print(server.url, flush=True)
        # A timed wait lets the main thread run the signal handler promptly.
        while not stop_requested.wait(0.5):
            pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
