"""Tests for metering.connection_log against logs that a real PostgreSQL 15 wrote.

The module-scoped fixtures start one throwaway server per logging setup (see
tests/pglog.py), open the sessions of ``pglog.run_sessions`` and stop the
server, so every test reads complete, real log files.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import re
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo, available_timezones

import pytest

from metering import connection_log
from metering.connection_log import LogFormatError, LoggedSession, ReadStats, read_sessions
from tests import pglog

FORMATS = ("stderr", "csv", "json")
SAMPLE_LOG = Path(__file__).resolve().parent.parent / "examples" / "postgres-connections.log.gz"

# One %t timestamp truncates the session's end by up to a second.
CLOCK_SLACK = timedelta(seconds=1)
# The time a session takes beyond what the scenario held it open: backend
# start, authentication, the statements and the exit.
SESSION_OVERHEAD_LIMIT = Decimal(3)

requires_postgres = pytest.mark.skipif(
    pglog.unavailable_reason() is not None,
    reason=f"no PostgreSQL 15 server to produce logs: {pglog.unavailable_reason()}",
)


@dataclasses.dataclass
class ServerLogs:
    files: pglog.LogFiles
    scenario: pglog.Scenario | None

    def path(self, log_format: str) -> Path:
        path = getattr(self.files, log_format)
        assert path is not None, f"the server was not configured to write {log_format} logs"
        return path


def _run_server(settings: dict[str, str], full_scenario: bool = True):
    with pglog.PostgresServer(settings) as server:
        if full_scenario:
            scenario = pglog.run_sessions(server)
        else:
            with server.connect() as connection:
                connection.execute("select 1")
            server.wait_for_disconnections(1)
            scenario = None
        server.stop()
        yield ServerLogs(server.log_files(), scenario)


@pytest.fixture(scope="module")
def utc_logs():
    """Logs with log_line_prefix '%m [%p] %q%u@%d ' in UTC."""
    yield from _run_server({"log_line_prefix": "%m [%p] %q%u@%d ", "log_timezone": "UTC"})


@pytest.fixture(scope="module")
def berlin_logs():
    """Logs with a %t prefix in Europe/Berlin, which logs CET or CEST."""
    yield from _run_server({
        "log_line_prefix": "%t [%p]: user=%u,db=%d,app=%a,client=%h ",
        "log_timezone": "Europe/Berlin",
    })


@pytest.fixture(scope="module")
def colombo_logs():
    """Logs in Asia/Colombo, whose tzdata abbreviation is the numeric +0530."""
    yield from _run_server(
        {"log_line_prefix": "%m [%p] ", "log_timezone": "Asia/Colombo"}, full_scenario=False,
    )


@pytest.fixture(scope="module")
def kolkata_logs():
    """Logs in Asia/Kolkata, which logs the ambiguous abbreviation IST."""
    yield from _run_server(
        {"log_line_prefix": "%m [%p] ", "log_timezone": "Asia/Kolkata"}, full_scenario=False,
    )


def _sessions_by_pid(sessions: list[LoggedSession]) -> dict[int, LoggedSession]:
    by_pid = {session.pid: session for session in sessions}
    assert len(by_pid) == len(sessions), "a pid was reused within one test server run"
    return by_pid


def _without_source(session: LoggedSession) -> LoggedSession:
    line = session.source.rsplit(":", 1)[1]
    return dataclasses.replace(session, source=f"line {line}")


def _assert_matches_scenario(sessions: list[LoggedSession], scenario: pglog.Scenario) -> None:
    assert len(sessions) == len(scenario.sessions)
    by_pid = _sessions_by_pid(sessions)
    for expected in scenario.sessions:
        session = by_pid[expected.pid]
        assert session.user == expected.user, expected.label
        assert session.database == expected.database, expected.label
        assert session.end_reason == expected.end_reason, expected.label
        assert session.duration > 0, expected.label
        assert session.duration >= Decimal(str(expected.held_seconds)), expected.label
        assert session.duration <= Decimal(str(expected.held_seconds)) + SESSION_OVERHEAD_LIMIT, (
            expected.label
        )
        assert session.ended_at.utcoffset() is not None, expected.label
        assert scenario.started_at - CLOCK_SLACK <= session.ended_at, expected.label
        assert session.ended_at <= scenario.finished_at + CLOCK_SLACK, expected.label
        assert session.connection_id.startswith("pglog:"), expected.label
        assert f":{expected.pid}:" in session.connection_id, expected.label


# ---------------------------------------------------------------------------
# Real server output, one test per format and prefix


@requires_postgres
@pytest.mark.parametrize("log_format", FORMATS)
def test_utc_log_matches_sessions(utc_logs, log_format):
    path = utc_logs.path(log_format)
    stats = ReadStats()

    sessions = list(read_sessions(path, log_format, stats))

    _assert_matches_scenario(sessions, utc_logs.scenario)
    for session in sessions:
        assert session.ended_at.utcoffset() == timedelta(0)
        assert session.source.startswith(f"{path}:")
    assert stats.unparseable_lines == 0
    assert stats.disconnections == len(sessions)
    assert stats.lines > len(sessions)


@requires_postgres
@pytest.mark.parametrize("log_format", FORMATS)
def test_auto_detects_format(utc_logs, log_format):
    path = utc_logs.path(log_format)

    detected = list(read_sessions(path))

    assert detected == list(read_sessions(path, log_format))


@requires_postgres
def test_formats_share_connection_ids(utc_logs):
    ids = {
        log_format: [session.connection_id for session in read_sessions(utc_logs.path(log_format))]
        for log_format in FORMATS
    }

    assert len(set(ids["stderr"])) == len(ids["stderr"])
    assert ids["csv"] == ids["stderr"]
    assert ids["json"] == ids["stderr"]


@requires_postgres
def test_rereading_gives_same_ids(utc_logs):
    path = utc_logs.path("stderr")

    first = [session.connection_id for session in read_sessions(path)]
    second = [session.connection_id for session in read_sessions(path)]

    assert first == second


@requires_postgres
@pytest.mark.parametrize("log_format", FORMATS)
def test_named_zone_with_t_prefix(berlin_logs, log_format):
    berlin = ZoneInfo("Europe/Berlin")

    sessions = list(read_sessions(berlin_logs.path(log_format), log_format))

    _assert_matches_scenario(sessions, berlin_logs.scenario)
    for session in sessions:
        assert session.ended_at.tzname() in ("CET", "CEST")
        assert session.ended_at.utcoffset() == session.ended_at.astimezone(berlin).utcoffset()
        if log_format == "stderr":
            assert session.ended_at.microsecond == 0


@requires_postgres
@pytest.mark.parametrize("log_format", FORMATS)
def test_numeric_offset_zone(colombo_logs, log_format):
    sessions = list(read_sessions(colombo_logs.path(log_format), log_format))

    assert len(sessions) == 1
    assert sessions[0].ended_at.utcoffset() == timedelta(hours=5, minutes=30)
    now = datetime.now(timezone.utc)
    assert now - timedelta(minutes=5) < sessions[0].ended_at <= now


@requires_postgres
def test_ambiguous_zone_raises(kolkata_logs):
    path = kolkata_logs.path("stderr")

    with pytest.raises(LogFormatError, match="'IST' is ambiguous") as raised:
        read_sessions(path)

    assert str(path) in str(raised.value)


@requires_postgres
def test_multiline_statement_is_skipped(utc_logs):
    stderr_text = utc_logs.path("stderr").read_text()
    csv_text = utc_logs.path("csv").read_text()

    # The real logs contain the statement's second line, as a tab-indented
    # continuation line in stderr and inside a quoted field in csvlog.
    assert "\n\t  'it''s \"quoted\"' as label" in stderr_text
    assert "\n  'it''s \"\"quoted\"\"' as label" in csv_text
    error_pid = utc_logs.scenario.by_label("error").pid
    for log_format in FORMATS:
        sessions = _sessions_by_pid(list(read_sessions(utc_logs.path(log_format))))
        assert sessions[error_pid].end_reason == "user_error", log_format


# ---------------------------------------------------------------------------
# Compression and byte counts


def _gzip_copy(source: Path, target: Path) -> Path:
    target.write_bytes(gzip.compress(source.read_bytes()))
    return target


@requires_postgres
@pytest.mark.parametrize("log_format", FORMATS)
def test_gzip_matches_plain(utc_logs, log_format, tmp_path):
    plain = utc_logs.path(log_format)
    # No .gz suffix: the reader detects gzip by its magic bytes.
    compressed = _gzip_copy(plain, tmp_path / plain.name)

    plain_sessions = [_without_source(s) for s in read_sessions(plain)]
    gzip_sessions = [_without_source(s) for s in read_sessions(compressed)]

    assert gzip_sessions == plain_sessions


@requires_postgres
@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_bytes_read_is_file_size(utc_logs, compress, tmp_path):
    path = utc_logs.path("stderr")
    if compress:
        path = _gzip_copy(path, tmp_path / "postgresql.log.gz")
    stats = ReadStats()

    for _ in read_sessions(path, stats=stats):
        assert 0 < stats.bytes_read <= path.stat().st_size

    assert stats.bytes_read == path.stat().st_size


@requires_postgres
def test_corrupt_gzip_raises(utc_logs, tmp_path):
    data = bytearray(gzip.compress(utc_logs.path("stderr").read_bytes()))
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(byte ^ 0xFF for byte in data[middle:middle + 16])
    path = tmp_path / "corrupt.log.gz"
    path.write_bytes(bytes(data))

    with pytest.raises(LogFormatError, match=re.escape(str(path))):
        list(read_sessions(path, "stderr"))


@requires_postgres
def test_truncated_gzip_raises(utc_logs, tmp_path):
    data = gzip.compress(utc_logs.path("stderr").read_bytes())
    path = tmp_path / "truncated.log.gz"
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(LogFormatError, match="ended before the end-of-stream marker"):
        list(read_sessions(path, "stderr"))


def test_broken_gzip_header_raises_on_call(tmp_path):
    path = tmp_path / "broken.gz"
    path.write_bytes(b"\x1f\x8b\x00not a gzip header at all")

    with pytest.raises(LogFormatError, match=re.escape(str(path))):
        read_sessions(path)


# ---------------------------------------------------------------------------
# Invalid arguments and files that are not logs


def test_missing_file_raises_on_call(tmp_path):
    path = tmp_path / "missing.log"

    with pytest.raises(LogFormatError) as raised:
        read_sessions(path)

    assert str(path) in str(raised.value)
    assert "No such file or directory" in str(raised.value)


def test_invalid_format_name_raises(tmp_path):
    with pytest.raises(ValueError) as raised:
        read_sessions(tmp_path / "any.log", log_format="xml")

    assert not isinstance(raised.value, LogFormatError)
    assert "'xml'" in str(raised.value)
    assert "auto, stderr, csv, json" in str(raised.value)


@requires_postgres
@pytest.mark.parametrize(
    ("actual", "requested", "expected_text"),
    [
        ("stderr", "csv", "not a PostgreSQL csv log"),
        ("stderr", "json", "not a PostgreSQL json log"),
        ("csv", "stderr", "not a PostgreSQL stderr log"),
        ("csv", "json", "not a PostgreSQL json log"),
        ("json", "stderr", "not a PostgreSQL stderr log"),
        ("json", "csv", "not a PostgreSQL csv log"),
    ],
)
def test_format_mismatch_raises(utc_logs, actual, requested, expected_text):
    path = utc_logs.path(actual)

    with pytest.raises(LogFormatError, match=expected_text) as raised:
        read_sessions(path, requested)

    assert str(path) in str(raised.value)


def test_text_file_is_not_a_log(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("shopping list\n- milk\n")

    with pytest.raises(LogFormatError, match="does not start with a timestamp"):
        read_sessions(path)


@pytest.mark.parametrize("log_format", ("auto",) + FORMATS)
def test_empty_file_yields_nothing(tmp_path, log_format):
    path = tmp_path / "empty.log"
    path.write_text("\n\n")

    assert list(read_sessions(path, log_format)) == []


# ---------------------------------------------------------------------------
# Damaged records and pid reuse, built from real log lines


@requires_postgres
@pytest.mark.parametrize("log_format", FORMATS)
def test_broken_session_time_is_counted(utc_logs, log_format, tmp_path):
    text = utc_logs.path(log_format).read_text()
    broken_text, replaced = re.subn(
        r"session time: \d+:\d\d:\d\d\.\d{3}", "session time: 0:0x:1", text, count=1,
    )
    assert replaced == 1
    path = tmp_path / f"broken.{log_format}"
    path.write_text(broken_text)
    stats = ReadStats()

    sessions = list(read_sessions(path, log_format, stats))

    assert stats.unparseable_lines == 1
    assert len(sessions) == len(utc_logs.scenario.sessions) - 1
    assert stats.disconnections == len(sessions)


@requires_postgres
def test_truncated_stderr_lines_are_counted(utc_logs, tmp_path):
    lines = utc_logs.path("stderr").read_text().splitlines(keepends=True)
    disconnections = [i for i, line in enumerate(lines) if "disconnection: session" in line]
    first, second = disconnections[0], disconnections[1]
    lines[first] = lines[first][: lines[first].index("session time") + 10] + "\n"
    lines[second] = lines[second][:15] + "\n"
    path = tmp_path / "truncated.log"
    path.write_text("".join(lines))
    stats = ReadStats()

    sessions = list(read_sessions(path, "stderr", stats))

    assert stats.unparseable_lines == 2
    assert stats.lines == len(lines)
    assert len(sessions) == len(utc_logs.scenario.sessions) - 2


@requires_postgres
def test_truncated_json_line_is_counted(utc_logs, tmp_path):
    lines = utc_logs.path("json").read_text().splitlines(keepends=True)
    index = next(i for i, line in enumerate(lines) if "disconnection: session" in line)
    lines[index] = lines[index][: len(lines[index]) // 2] + "\n"
    path = tmp_path / "truncated.json"
    path.write_text("".join(lines))
    stats = ReadStats()

    sessions = list(read_sessions(path, "json", stats))

    assert stats.unparseable_lines == 1
    assert len(sessions) == len(utc_logs.scenario.sessions) - 1


@requires_postgres
def test_session_time_over_a_day(utc_logs, tmp_path):
    text = utc_logs.path("stderr").read_text()
    last_pid = utc_logs.scenario.by_label("last").pid
    pattern = rf"(\[{last_pid}\].*session time: )\d+:\d\d:\d\d\.\d{{3}}"
    long_text, replaced = re.subn(pattern, r"\g<1>27:03:04.005", text)
    assert replaced == 1
    path = tmp_path / "long.log"
    path.write_text(long_text)

    sessions = _sessions_by_pid(list(read_sessions(path)))

    assert sessions[last_pid].duration == Decimal("97384.005")


def _stderr_lines_of(text: str, pid: int) -> list[str]:
    return [line for line in text.splitlines(keepends=True) if f" [{pid}] " in line]


def _without_connection_lines(lines: list[str]) -> list[str]:
    return [
        line for line in lines
        if "connection received" not in line and "connection authorized" not in line
    ]


def _move_to_pid(lines: list[str], old_pid: int, new_pid: int) -> list[str]:
    """Rewrite real lines as if PostgreSQL had reused ``new_pid`` for their process."""
    return [line.replace(f" [{old_pid}] ", f" [{new_pid}] ") for line in lines]


def _failed_connection_pid(text: str) -> int:
    match = re.search(
        rf"\[(\d+)\] .*FATAL:  database \"{pglog.MISSING_DATABASE}\" does not exist", text,
    )
    assert match is not None, "the log has no failed connection attempt"
    return int(match[1])


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(lines))
    return path


@requires_postgres
@pytest.mark.parametrize("first_label", ["error", "terminated"])
@pytest.mark.parametrize("keep_connection_lines", [True, False], ids=["connections", "no-connections"])
def test_pid_reuse_after_disconnection(utc_logs, tmp_path, first_label, keep_connection_lines):
    text = utc_logs.path("stderr").read_text()
    first = utc_logs.scenario.by_label(first_label)
    later = utc_logs.scenario.by_label("last")
    lines = _stderr_lines_of(text, first.pid) + _move_to_pid(
        _stderr_lines_of(text, later.pid), later.pid, first.pid,
    )
    if not keep_connection_lines:
        lines = _without_connection_lines(lines)
    path = _write_lines(tmp_path / "reused.log", lines)

    sessions = list(read_sessions(path))

    assert [session.pid for session in sessions] == [first.pid, first.pid]
    assert sessions[0].end_reason == first.end_reason
    assert sessions[1].end_reason == "client_disconnect"
    assert sessions[0].connection_id != sessions[1].connection_id


@requires_postgres
@pytest.mark.parametrize("keep_connection_lines", [True, False], ids=["connections", "no-connections"])
def test_pid_reuse_after_failed_connection(utc_logs, tmp_path, keep_connection_lines):
    # The failed attempt's FATAL is never followed by a disconnection, so only
    # the new connection's records or its start time can show that it is stale.
    text = utc_logs.path("stderr").read_text()
    failed_pid = _failed_connection_pid(text)
    later = utc_logs.scenario.by_label("last")
    lines = _stderr_lines_of(text, failed_pid) + _move_to_pid(
        _stderr_lines_of(text, later.pid), later.pid, failed_pid,
    )
    if not keep_connection_lines:
        lines = _without_connection_lines(lines)
    path = _write_lines(tmp_path / "reused.log", lines)

    sessions = list(read_sessions(path))

    assert len(sessions) == 1
    assert sessions[0].pid == failed_pid
    assert sessions[0].end_reason == "client_disconnect"


@requires_postgres
def test_pid_reuse_in_same_millisecond(utc_logs, tmp_path):
    # With the later session moved onto the failed attempt's timestamp, its
    # start time cannot tell the FATAL apart, so the connection records must.
    text = utc_logs.path("stderr").read_text()
    failed_pid = _failed_connection_pid(text)
    failed_lines = _stderr_lines_of(text, failed_pid)
    timestamp = failed_lines[-1][: len("2026-01-01 00:00:00.000 UTC")]
    later = utc_logs.scenario.by_label("last")
    moved = _move_to_pid(_stderr_lines_of(text, later.pid), later.pid, failed_pid)
    lines = failed_lines + [timestamp + line[len(timestamp):] for line in moved]
    path = _write_lines(tmp_path / "reused.log", lines)

    sessions = list(read_sessions(path))

    assert len(sessions) == 1
    assert sessions[0].ended_at == connection_log._parse_timestamp(timestamp)
    assert sessions[0].end_reason == "client_disconnect"


@requires_postgres
def test_pending_errors_are_bounded(utc_logs, monkeypatch, caplog):
    monkeypatch.setattr(connection_log, "_MAX_TRACKED_PIDS", 5)
    text = utc_logs.path("stderr").read_text()
    failed_pid = _failed_connection_pid(text)
    fatal_line = next(line for line in _stderr_lines_of(text, failed_pid) if " FATAL: " in line)
    error_pid = utc_logs.scenario.by_label("error").pid
    # Failed connections of 50 other pids, which never log a disconnection.
    lines = _stderr_lines_of(text, error_pid)[:-1]
    lines += [fatal_line.replace(f" [{failed_pid}] ", f" [{900_000 + i}] ") for i in range(50)]
    lines += _stderr_lines_of(text, error_pid)[-1:]
    tracker = connection_log._SessionTracker("reused.log", ReadStats())
    records = connection_log._read_stderr_records(io.StringIO("".join(lines)), "reused.log", ReadStats())

    sessions = []
    for record in records:
        session = tracker.add(record)
        if session is not None:
            sessions.append(session)
        assert len(tracker._pending) <= 5

    # The error session's ERROR was the oldest entry, so it was dropped.
    assert [session.end_reason for session in sessions] == ["client_disconnect"]
    warnings = [record for record in caplog.records if "more than 5 processes" in record.message]
    assert len(warnings) == 1


@requires_postgres
def test_stderr_without_pid(utc_logs, tmp_path):
    text = re.sub(r" \[\d+\] ", " ", utc_logs.path("stderr").read_text())
    path = tmp_path / "no-pid.log"
    path.write_text(text)

    sessions = list(read_sessions(path))

    assert len(sessions) == len(utc_logs.scenario.sessions)
    assert {session.pid for session in sessions} == {0}
    assert {session.end_reason for session in sessions} == {"client_disconnect"}
    assert len({session.connection_id for session in sessions}) == len(sessions)


# ---------------------------------------------------------------------------
# The sample log shipped in examples/ and the zone table


@pytest.mark.skipif(not SAMPLE_LOG.exists(), reason=f"{SAMPLE_LOG} is missing")
def test_sample_log_totals():
    stats = ReadStats()

    sessions = list(read_sessions(SAMPLE_LOG, stats=stats))

    assert len(sessions) == 26_478
    assert sum(session.database.startswith("org_") for session in sessions) == 26_466
    assert sum(session.database == "postgres" for session in sessions) == 12
    assert len({session.connection_id for session in sessions}) == len(sessions)
    reasons = {
        (session.pid, session.end_reason)
        for session in sessions
        if session.end_reason != "client_disconnect"
    }
    assert reasons == {
        (4335, "fatal_error"),
        (4323, "user_error"),
        (4326, "user_error"),
        (4329, "user_error"),
        (4336, "user_error"),
        (4301, "user_error"),
        (4302, "user_error"),
    }
    assert stats.unparseable_lines == 0
    assert stats.disconnections == 26_478
    assert stats.bytes_read == SAMPLE_LOG.stat().st_size


def _tzdata_abbreviations() -> dict[str, set[timedelta]]:
    """Map each letter abbreviation that tzdata uses in 2026 to its offsets."""
    offsets: dict[str, set[timedelta]] = {}
    for name in available_timezones():
        if name.startswith(("Etc/", "SystemV/", "posix/", "right/")):
            continue
        zone = ZoneInfo(name)
        for month in range(1, 13):
            moment = datetime(2026, month, 15, 12, tzinfo=zone)
            abbreviation = moment.tzname()
            if abbreviation[0] not in "+-":
                offsets.setdefault(abbreviation, set()).add(moment.utcoffset())
    return offsets


def test_zone_table_matches_tzdata():
    tzdata = _tzdata_abbreviations()

    for abbreviation, minutes in connection_log._ZONE_ABBREVIATIONS.items():
        assert tzdata.get(abbreviation) == {timedelta(minutes=minutes)}, abbreviation
    for abbreviation in connection_log._AMBIGUOUS_ZONE_ABBREVIATIONS:
        assert len(tzdata.get(abbreviation, ())) > 1, abbreviation
