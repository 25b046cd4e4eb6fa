"""Read PostgreSQL server logs and turn each disconnection record into a session.

PostgreSQL writes one ``LOG:  disconnection: session time: H:MM:SS.mmm user=…
database=… host=…`` record per client session when ``log_disconnections`` is on.
``read_sessions`` streams a log file, plain or gzip, in one of the three
formats the server writes:

* ``stderr``: text lines whose ``log_line_prefix`` begins with ``%m`` or ``%t``.
  The process id comes from the first ``[digits]`` in the prefix (``[%p]``), so
  a prefix without it yields sessions with ``pid == 0`` and no end reason.
* ``csv``: the ``csvlog`` destination. PostgreSQL 15 writes 26 columns, and
  the reader uses only the first 14, from log_time to message.
* ``json``: the ``jsonlog`` destination (PostgreSQL 15 and later), one object
  per line.

The reader matches the English message texts, so the server must log with
``lc_messages`` set to ``C`` or an English locale.

This module uses only the standard library and imports no Django code, so the
management command can import it before Django is set up.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import logging
import os
import re
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Callable, NamedTuple, TextIO

logger = logging.getLogger(__name__)

LOG_FORMATS = ("auto", "stderr", "csv", "json")

END_REASON_CLIENT_DISCONNECT = "client_disconnect"
END_REASON_USER_ERROR = "user_error"
END_REASON_FATAL_ERROR = "fatal_error"

# Severities that PostgreSQL writes in the error_severity field of csvlog and
# jsonlog. All DEBUG1..DEBUG5 levels are written as "DEBUG".
_SEVERITIES = frozenset(
    {"DEBUG", "INFO", "NOTICE", "WARNING", "ERROR", "LOG", "FATAL", "PANIC"}
)

# Fixed offsets of the zone abbreviations that tzdata 2026 uses for exactly one
# UTC offset, in minutes east of UTC.
_ZONE_ABBREVIATIONS = {
    "UTC": 0, "GMT": 0, "WET": 0, "WEST": 60, "BST": 60,
    "CET": 60, "CEST": 120, "MET": 60, "MEST": 120, "EET": 120, "EEST": 180,
    "MSK": 180, "WAT": 60, "CAT": 120, "EAT": 180, "SAST": 120, "IDT": 180,
    "PKT": 300, "WIB": 420, "WITA": 480, "WIT": 540, "HKT": 480,
    "AWST": 480, "JST": 540, "KST": 540, "ACST": 570, "ACDT": 630,
    "AEST": 600, "AEDT": 660, "ChST": 600, "NZST": 720, "NZDT": 780,
    "SST": -660, "HST": -600, "HDT": -540, "AKST": -540, "AKDT": -480,
    "PDT": -420, "MST": -420, "MDT": -360, "EST": -300, "EDT": -240,
    "AST": -240, "ADT": -180, "NST": -210, "NDT": -150,
}

# Abbreviations that tzdata 2026 uses for more than one offset. The reader
# rejects them because a wrong guess would shift every session by hours.
_AMBIGUOUS_ZONE_ABBREVIATIONS = {
    "CST": "America/Chicago -06:00, America/Havana -05:00, Asia/Shanghai +08:00",
    "CDT": "America/Chicago -05:00, America/Havana -04:00",
    "IST": "Asia/Kolkata +05:30, Asia/Jerusalem +02:00, Europe/Dublin +01:00",
    "PST": "America/Los_Angeles -08:00, Asia/Manila +08:00",
}

_TIMESTAMP_PATTERN = (
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)? (?:[A-Za-z]+|[+-]\d\d(?:\d\d)?)"
)
_TIMESTAMP = re.compile(_TIMESTAMP_PATTERN + r"\Z")

# One stderr record: the timestamp that starts log_line_prefix, the rest of the
# prefix, the severity and the message. With log_error_verbosity = verbose the
# SQLSTATE code follows the severity.
_STDERR_RECORD = re.compile(
    r"(?P<timestamp>" + _TIMESTAMP_PATTERN + r")"
    r"(?P<prefix>.*?)"
    r"(?P<severity>LOG|ERROR|FATAL|PANIC|WARNING|NOTICE|INFO|DEBUG"
    r"|DETAIL|HINT|QUERY|CONTEXT|LOCATION|STATEMENT|BACKTRACE):  "
    r"(?:[0-9A-Z]{5}: )?"
    r"(?P<message>.*)"
)
_STDERR_PID = re.compile(r"\[(\d+)\]")
_LOOKS_LIKE_STDERR_RECORD = re.compile(r"\d{4}-\d\d-\d\d ")

_DISCONNECTION = re.compile(
    r"disconnection: session time: "
    r"(?P<hours>\d+):(?P<minutes>[0-5]\d):(?P<seconds>[0-5]\d)\.(?P<millis>\d{3}) "
    r"user=(?P<user>.*?) database=(?P<database>.*) "
    r"host=(?P<host>\S*)(?: port=(?P<port>\d+))?"
)
_SESSION_START_MESSAGES = (
    "connection received: ",
    "connection authorized: ",
    "replication connection authorized: ",
)

# csvlog column positions as PostgreSQL 15 writes them.
_CSV_LOG_TIME = 0
_CSV_PROCESS_ID = 3
_CSV_ERROR_SEVERITY = 11
_CSV_MESSAGE = 13
_CSV_MIN_COLUMNS = 14

# Raised from the csv module's default of 131072 characters, because a
# STATEMENT logged with a large query is a single field.
_CSV_FIELD_SIZE_LIMIT = 64 * 1024 * 1024

# Upper bound on the pids whose ERROR or FATAL is remembered until their
# disconnection record. Entries for processes that never log a disconnection
# (failed authentication, background workers) stay until the pid is reused,
# so the oldest entry is dropped when the bound is reached.
_MAX_TRACKED_PIDS = 100_000

# A session's own records never precede its start, which is the disconnection
# time minus the session time. Both the session time and %m timestamps are
# truncated to milliseconds, and %t timestamps to whole seconds, so a record
# may appear up to one unit of each before the computed start.
_SESSION_TIME_RESOLUTION = timedelta(milliseconds=1)
_MILLISECOND_TIMESTAMP_RESOLUTION = timedelta(milliseconds=1)
_SECOND_TIMESTAMP_RESOLUTION = timedelta(seconds=1)

_MAX_LOGGED_UNPARSEABLE_LINES = 10


@dataclass(frozen=True)
class LoggedSession:
    """One client session, built from its disconnection record."""

    # Same value each time the same record is read; see _connection_id.
    connection_id: str
    # The disconnection record's timestamp, in the zone the log wrote.
    ended_at: datetime
    # PostgreSQL's "session time" in seconds, exact to the millisecond.
    duration: Decimal
    user: str
    # Empty for a physical replication connection.
    database: str
    # 0 when a stderr log_line_prefix has no [%p].
    pid: int
    # One of the END_REASON_* values.
    end_reason: str
    # "path:line" of the disconnection record.
    source: str


@dataclass
class ReadStats:
    """Counts that ``read_sessions`` updates while it reads a file."""

    # Physical lines read so far.
    lines: int = 0
    # Records, or lines that start like one, that could not be parsed and
    # were skipped, such as a disconnection record with a broken session time.
    unparseable_lines: int = 0
    # Disconnection records turned into sessions.
    disconnections: int = 0
    # Bytes read from the file, compressed bytes for gzip, so that a caller
    # can compare it with os.path.getsize to show progress.
    bytes_read: int = 0


class LogFormatError(ValueError):
    """A file that cannot be read as a PostgreSQL log in the requested format."""


class _ZoneError(ValueError):
    """A zone abbreviation that this module cannot turn into one UTC offset."""


class _Record(NamedTuple):
    timestamp: str
    pid: int | None
    severity: str
    message: str
    line: int


def read_sessions(
    path: str | os.PathLike,
    log_format: str = "auto",
    stats: ReadStats | None = None,
) -> Iterator[LoggedSession]:
    """Stream the sessions of a PostgreSQL log file, in file order.

    ``log_format`` is one of ``LOG_FORMATS``. ``auto`` picks json when the first
    non-empty line is a JSON object, csv when it is a CSV row whose 12th field
    is a severity, and stderr otherwise. Gzip files are recognised by their
    magic bytes, whatever their name.

    The format name, the file's readability and its first record are checked
    before this function returns. Raises ``ValueError`` for an unknown format
    name and ``LogFormatError`` for a file that cannot be opened or does not
    match the format. The iterator raises ``LogFormatError`` for a gzip stream
    that turns out corrupt or truncated and for a timestamp whose zone
    abbreviation has no single known offset, after yielding the sessions
    before that point.
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(
            f"invalid log format {log_format!r}: expected one of {', '.join(LOG_FORMATS)}"
        )
    path = os.fspath(path)
    resolved_format = _check_first_record(path, log_format)
    logger.debug("reading %s as %s log", path, resolved_format)
    return _read_sessions(path, resolved_format, stats if stats is not None else ReadStats())


def _read_sessions(path: str, log_format: str, stats: ReadStats) -> Iterator[LoggedSession]:
    read_records = _RECORD_READERS[log_format]
    tracker = _SessionTracker(path, stats)
    newline = "" if log_format == "csv" else "\n"
    try:
        with _open_text(path, newline, stats) as stream:
            for record in read_records(stream, path, stats):
                session = tracker.add(record)
                if session is not None:
                    yield session
    except (OSError, EOFError, zlib.error) as error:
        raise LogFormatError(
            f"cannot read log file {path} after line {stats.lines}: {_error_text(error)}"
        ) from error


# ---------------------------------------------------------------------------
# Opening files and detecting the format


class _CountingReader(io.RawIOBase):
    """A raw binary stream that adds every byte it reads to ``stats.bytes_read``."""

    def __init__(self, raw: io.RawIOBase, stats: ReadStats):
        super().__init__()
        self._raw = raw
        self._stats = stats

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = self._raw.readinto(buffer)
        self._stats.bytes_read += count or 0
        return count


@contextmanager
def _open_text(path: str, newline: str, stats: ReadStats) -> Iterator[TextIO]:
    """Open a plain or gzip log file as UTF-8 text.

    Bytes that are not UTF-8, which a server can write when databases use other
    encodings, decode to U+FFFD instead of raising.
    """
    with open(path, "rb", buffering=0) as raw:
        is_gzip = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        binary = io.BufferedReader(_CountingReader(raw, stats))
        if is_gzip:
            binary = gzip.GzipFile(fileobj=binary, mode="rb")
        with io.TextIOWrapper(binary, encoding="utf-8", errors="replace", newline=newline) as stream:
            yield stream


def _check_first_record(path: str, log_format: str) -> str:
    """Return the format of ``path``, after checking that its first record matches it."""
    try:
        with _open_text(path, "\n", ReadStats()) as stream:
            first_line = _first_non_empty_line(stream)
    except (OSError, EOFError, zlib.error) as error:
        raise LogFormatError(f"cannot read log file {path}: {_error_text(error)}") from error
    if first_line is None:
        return "stderr" if log_format == "auto" else log_format

    if log_format == "auto":
        log_format = _detect_format(first_line)
    problem = _FIRST_RECORD_CHECKS[log_format](first_line)
    if problem is not None:
        raise LogFormatError(f"{path} is not a PostgreSQL {log_format} log: {problem}")
    return log_format


def _first_non_empty_line(stream: TextIO) -> str | None:
    """Return the first line that is neither blank nor a stderr continuation line."""
    for line in stream:
        if line.strip() and not line.startswith("\t"):
            return line.rstrip("\r\n")
    return None


def _detect_format(first_line: str) -> str:
    if first_line.lstrip().startswith("{"):
        return "json"
    if _check_csv_record(first_line) is None:
        return "csv"
    return "stderr"


def _check_stderr_record(line: str) -> str | None:
    match = _STDERR_RECORD.match(line)
    if match is None:
        return (
            "the first line does not start with a timestamp and a severity "
            "(expected a log_line_prefix that begins with %m or %t): "
            f"{_shorten(line)!r}"
        )
    return _check_timestamp(match["timestamp"])


def _check_csv_record(line: str) -> str | None:
    row = next(csv.reader([line]), [])
    if len(row) <= _CSV_ERROR_SEVERITY:
        return f"the first row has {len(row)} fields, but csvlog rows have at least 23"
    if row[_CSV_ERROR_SEVERITY] not in _SEVERITIES:
        return f"the 12th field of the first row is {_shorten(row[11])!r}, not a severity"
    return _check_timestamp(row[_CSV_LOG_TIME])


def _check_json_record(line: str) -> str | None:
    try:
        entry = json.loads(line)
    except ValueError as error:
        return f"the first line is not a JSON object: {error}"
    if not isinstance(entry, dict) or "timestamp" not in entry or "error_severity" not in entry:
        return "the first line is not a JSON object with timestamp and error_severity keys"
    return _check_timestamp(str(entry["timestamp"]))


def _check_timestamp(text: str) -> str | None:
    try:
        _parse_timestamp(text)
    except ValueError as error:
        return str(error)
    return None


_FIRST_RECORD_CHECKS: dict[str, Callable[[str], str | None]] = {
    "stderr": _check_stderr_record,
    "csv": _check_csv_record,
    "json": _check_json_record,
}


# ---------------------------------------------------------------------------
# One record reader per format


def _read_stderr_records(stream: TextIO, path: str, stats: ReadStats) -> Iterator[_Record]:
    for line in stream:
        stats.lines += 1
        line = line.rstrip("\n")
        if not line.strip() or line.startswith("\t"):
            continue
        match = _STDERR_RECORD.match(line)
        if match is None:
            # Lines without a timestamp are usually output of other programs
            # that reached the server's stderr, and are skipped silently.
            # A line that starts with a date or contains a disconnection is
            # a damaged record, so it is counted.
            if _LOOKS_LIKE_STDERR_RECORD.match(line) or "disconnection: " in line:
                _count_unparseable(stats, path, stats.lines, "no timestamp and severity")
            continue
        pid_match = _STDERR_PID.search(match["prefix"])
        yield _Record(
            timestamp=match["timestamp"],
            pid=int(pid_match[1]) if pid_match else None,
            severity=match["severity"],
            message=match["message"],
            line=stats.lines,
        )


def _read_csv_records(stream: TextIO, path: str, stats: ReadStats) -> Iterator[_Record]:
    # NOTE: the csv module's field size limit is process-wide.
    if csv.field_size_limit() < _CSV_FIELD_SIZE_LIMIT:
        csv.field_size_limit(_CSV_FIELD_SIZE_LIMIT)
    reader = csv.reader(stream)
    while True:
        first_line = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            stats.lines = reader.line_num
            _count_unparseable(stats, path, first_line, str(error))
            continue
        stats.lines = reader.line_num
        if not row:
            continue
        if len(row) < _CSV_MIN_COLUMNS or not row[_CSV_PROCESS_ID].isdigit():
            _count_unparseable(stats, path, first_line, f"csv row with {len(row)} fields")
            continue
        yield _Record(
            timestamp=row[_CSV_LOG_TIME],
            pid=int(row[_CSV_PROCESS_ID]),
            severity=row[_CSV_ERROR_SEVERITY],
            message=row[_CSV_MESSAGE],
            line=first_line,
        )


def _read_json_records(stream: TextIO, path: str, stats: ReadStats) -> Iterator[_Record]:
    for line in stream:
        stats.lines += 1
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            record = _Record(
                timestamp=str(entry["timestamp"]),
                pid=int(entry["pid"]),
                severity=str(entry["error_severity"]),
                message=str(entry["message"]),
                line=stats.lines,
            )
        except (ValueError, TypeError, KeyError) as error:
            reason = f"invalid jsonlog entry ({type(error).__name__}: {error})"
            _count_unparseable(stats, path, stats.lines, reason)
            continue
        yield record


_RECORD_READERS: dict[str, Callable[[TextIO, str, ReadStats], Iterator[_Record]]] = {
    "stderr": _read_stderr_records,
    "csv": _read_csv_records,
    "json": _read_json_records,
}


# ---------------------------------------------------------------------------
# Shared step: records to sessions


class _PendingErrors:
    """The last FATAL and the last ERROR that one pid logged.

    Each is stored as the latest session start for which the record can
    belong to that session, or None when the pid logged no such record.
    """

    __slots__ = ("fatal_bound", "error_bound")

    def __init__(self) -> None:
        self.fatal_bound: datetime | None = None
        self.error_bound: datetime | None = None

    def end_reason(self, session_start: datetime) -> str:
        # A record from before the session's start came from an earlier
        # process with the same pid whose end was not logged.
        if self.fatal_bound is not None and session_start <= self.fatal_bound:
            return END_REASON_FATAL_ERROR
        if self.error_bound is not None and session_start <= self.error_bound:
            return END_REASON_USER_ERROR
        return END_REASON_CLIENT_DISCONNECT


class _SessionTracker:
    """Turn records into sessions and attach each ERROR or FATAL to its session.

    State is kept only for pids that logged an ERROR or FATAL and have not
    disconnected yet. A pid's state is dropped at its disconnection and at a
    new connection with the same pid. Without ``log_connections``, a stale
    record from an earlier process with the same pid is recognised by its
    timestamp, which lies before the new session's start.

    NOTE: without log_connections, a %t log cannot separate a FATAL of a
    failed connection from a new session that reuses its pid within about a
    second, and the new session is reported as "fatal_error".
    """

    def __init__(self, path: str, stats: ReadStats):
        self._path = path
        self._stats = stats
        self._pending: dict[int, _PendingErrors] = {}
        self._warned_about_bound = False

    def add(self, record: _Record) -> LoggedSession | None:
        severity = record.severity
        if severity == "LOG":
            message = record.message
            if message.startswith("disconnection: "):
                return self._end_session(record)
            if record.pid is not None and message.startswith(_SESSION_START_MESSAGES):
                self._pending.pop(record.pid, None)
        elif severity in ("FATAL", "PANIC", "ERROR"):
            self._remember_error(record)
        return None

    def _remember_error(self, record: _Record) -> None:
        if record.pid is None:
            return
        logged_at = self._parse_timestamp(record)
        if logged_at is None:
            return
        pending = self._pending.get(record.pid)
        if pending is None:
            if len(self._pending) >= _MAX_TRACKED_PIDS:
                self._drop_oldest()
            pending = self._pending[record.pid] = _PendingErrors()

        if "." in record.timestamp:
            resolution = _MILLISECOND_TIMESTAMP_RESOLUTION
        else:
            resolution = _SECOND_TIMESTAMP_RESOLUTION
        bound = logged_at + resolution + _SESSION_TIME_RESOLUTION
        if record.severity == "ERROR":
            pending.error_bound = bound
        else:
            pending.fatal_bound = bound

    def _drop_oldest(self) -> None:
        oldest_pid = next(iter(self._pending))
        del self._pending[oldest_pid]
        if not self._warned_about_bound:
            self._warned_about_bound = True
            logger.warning(
                "%s: more than %s processes logged an error without a disconnection; "
                "dropping the oldest, starting with pid %s",
                self._path, _MAX_TRACKED_PIDS, oldest_pid,
            )

    def _end_session(self, record: _Record) -> LoggedSession | None:
        match = _DISCONNECTION.fullmatch(record.message)
        if match is None:
            _count_unparseable(self._stats, self._path, record.line, "invalid disconnection record")
            return None
        ended_at = self._parse_timestamp(record)
        if ended_at is None:
            return None

        duration = Decimal(
            f"{int(match['hours']) * 3600 + int(match['minutes']) * 60 + int(match['seconds'])}"
            f".{match['millis']}"
        )
        pid = record.pid if record.pid is not None else 0
        end_reason = END_REASON_CLIENT_DISCONNECT
        pending = self._pending.pop(pid, None) if record.pid is not None else None
        if pending is not None:
            end_reason = pending.end_reason(ended_at - timedelta(seconds=float(duration)))

        self._stats.disconnections += 1
        return LoggedSession(
            connection_id=_connection_id(record, ended_at),
            ended_at=ended_at,
            duration=duration,
            user=match["user"],
            database=match["database"],
            pid=pid,
            end_reason=end_reason,
            source=f"{self._path}:{record.line}",
        )

    def _parse_timestamp(self, record: _Record) -> datetime | None:
        try:
            return _parse_timestamp(record.timestamp)
        except _ZoneError as error:
            raise LogFormatError(f"{self._path}:{record.line}: {error}") from error
        except ValueError as error:
            _count_unparseable(self._stats, self._path, record.line, str(error))
            return None


def _connection_id(record: _Record, ended_at: datetime) -> str:
    """Build an id that is the same each time the same record is read.

    One process cannot end two sessions at the same instant, so the end time
    and pid identify a session even when PostgreSQL reuses the pid. The digest
    of the message separates records that share both anyway. Without a pid the
    line number takes its place, which keeps the id stable for the same file.
    """
    identity = record.message if record.pid is not None else f"{record.line}\n{record.message}"
    digest = hashlib.sha1(identity.encode("utf-8")).hexdigest()[:16]
    ended_at_utc = ended_at.astimezone(timezone.utc).isoformat(timespec="milliseconds")
    return f"pglog:{ended_at_utc}:{record.pid or 0}:{digest}"


def _parse_timestamp(text: str) -> datetime:
    """Parse a ``%m`` or ``%t`` timestamp such as ``2026-12-04 19:29:38.232 UTC``.

    Raises ``ValueError`` for a malformed timestamp, and its subclass
    ``_ZoneError`` for a zone abbreviation that is unknown or names more than
    one offset.
    """
    if _TIMESTAMP.match(text) is None:
        raise ValueError(f"invalid timestamp {_shorten(text)!r}")
    local_time, zone_name = text.rsplit(" ", 1)
    naive = datetime.fromisoformat(local_time)
    return naive.replace(tzinfo=_parse_zone(zone_name))


def _parse_zone(name: str) -> timezone:
    if name == "UTC":
        return timezone.utc
    if name[0] in "+-":
        sign = -1 if name[0] == "-" else 1
        hours = int(name[1:3])
        minutes = int(name[3:5] or 0)
        return timezone(sign * timedelta(hours=hours, minutes=minutes))
    if name in _AMBIGUOUS_ZONE_ABBREVIATIONS:
        raise _ZoneError(
            f"time zone abbreviation {name!r} is ambiguous "
            f"({_AMBIGUOUS_ZONE_ABBREVIATIONS[name]}); set log_timezone to 'UTC' "
            "or to a zone whose abbreviation is unique"
        )
    offset = _ZONE_ABBREVIATIONS.get(name)
    if offset is None:
        raise _ZoneError(
            f"unknown time zone abbreviation {name!r}; set log_timezone to 'UTC'"
        )
    return timezone(timedelta(minutes=offset), name)


# ---------------------------------------------------------------------------
# Helpers


def _count_unparseable(stats: ReadStats, path: str, line: int, reason: str) -> None:
    stats.unparseable_lines += 1
    if stats.unparseable_lines <= _MAX_LOGGED_UNPARSEABLE_LINES:
        logger.warning("%s:%s: skipping unparseable log record: %s", path, line, reason)
    if stats.unparseable_lines == _MAX_LOGGED_UNPARSEABLE_LINES:
        logger.warning("%s: further unparseable records are counted but not logged", path)


def _error_text(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "…"
