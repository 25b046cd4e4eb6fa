"""Run a throwaway PostgreSQL 15 server to produce real server logs for tests.

The server uses Debian's binaries under ``/usr/lib/postgresql/15/bin``, a data
directory in a fresh temporary directory, a unix socket in that directory and
a free port on 127.0.0.1. When the tests run as root, initdb and the server run
as the ``postgres`` user through ``runuser``, because PostgreSQL refuses to run
as root.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import psycopg

PG_BIN = Path("/usr/lib/postgresql/15/bin")
SERVER_USER = "postgres"

# Bounds for waiting on the server and on the logging collector.
START_TIMEOUT_SECONDS = 30
LOG_WAIT_TIMEOUT_SECONDS = 10


def unavailable_reason() -> str | None:
    """Return why a server cannot be started here, or None when it can."""
    for program in ("initdb", "pg_ctl", "postgres"):
        if not (PG_BIN / program).exists():
            return f"{PG_BIN / program} is missing (install the postgresql-15 package)"
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            return "running as root, but runuser is missing"
        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError:
            return f"running as root, but there is no {SERVER_USER!r} user to run the server"
    return None


@dataclasses.dataclass
class LogFiles:
    """Log files that one server run wrote, one per log_destination."""

    stderr: Path
    csv: Path | None
    json: Path | None


class PostgresServer:
    """A PostgreSQL server in its own temporary directory.

    ``settings`` go to ``postgresql.auto.conf`` on top of the logging settings
    that every test needs. Use it as a context manager: leaving the block stops
    the server and removes the directory.
    """

    def __init__(self, settings: dict[str, str], destinations: str = "stderr,csvlog,jsonlog"):
        self.root = Path(tempfile.mkdtemp(prefix="pglog-"))
        self.data_dir = self.root / "data"
        self.log_dir = self.root / "log"
        self.port = _free_port()
        self.destinations = destinations
        self.settings = settings
        self._started = False

    def __enter__(self) -> PostgresServer:
        try:
            self._initdb()
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def connect(self, dbname: str = "postgres", user: str = "postgres", tcp: bool = False):
        """Open an autocommit connection over the unix socket, or over TCP when asked."""
        host = "127.0.0.1" if tcp else str(self.root)
        return psycopg.connect(
            host=host, port=self.port, dbname=dbname, user=user, autocommit=True,
            connect_timeout=10,
        )

    def stop(self) -> None:
        """Stop the server with a fast shutdown, which flushes the logging collector."""
        if self._started:
            self._started = False
            _run_as_server_user(
                [str(PG_BIN / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w",
                 "-t", str(START_TIMEOUT_SECONDS), "stop"],
            )

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def log_files(self) -> LogFiles:
        return LogFiles(
            stderr=self.log_dir / "postgresql.log",
            csv=self.log_dir / "postgresql.csv" if "csvlog" in self.destinations else None,
            json=self.log_dir / "postgresql.json" if "jsonlog" in self.destinations else None,
        )

    def wait_for_disconnections(self, count: int) -> None:
        """Wait until the stderr log contains ``count`` disconnection records.

        The logging collector writes asynchronously, so a test that reads the
        log right after closing a connection could miss its last records.
        """
        path = self.log_files().stderr
        deadline = time.monotonic() + LOG_WAIT_TIMEOUT_SECONDS
        while True:
            found = path.read_text(errors="replace").count("disconnection: session time:")
            if found >= count:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"timed out after {LOG_WAIT_TIMEOUT_SECONDS} s waiting for {count} "
                    f"disconnection records in {path}, found {found}"
                )
            time.sleep(0.05)

    def _initdb(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.root, user=SERVER_USER)
        _run_as_server_user(
            [str(PG_BIN / "initdb"), "-D", str(self.data_dir), "-U", "postgres",
             "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"],
        )
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.root),
            "fsync": "off",
            "log_connections": "on",
            "log_disconnections": "on",
            "logging_collector": "on",
            "log_destination": self.destinations,
            "log_directory": str(self.log_dir),
            "log_filename": "postgresql.log",
            "log_file_mode": "0644",
            "lc_messages": "C",
            **self.settings,
        }
        lines = [f"{name} = '{_quote(value)}'\n" for name, value in settings.items()]
        auto_conf = self.data_dir / "postgresql.auto.conf"
        with auto_conf.open("a") as conf:
            conf.writelines(lines)

    def _start(self) -> None:
        _run_as_server_user(
            [str(PG_BIN / "pg_ctl"), "-D", str(self.data_dir), "-w",
             "-t", str(START_TIMEOUT_SECONDS), "-l", str(self.root / "startup.log"), "start"],
        )
        self._started = True


def _quote(value: str) -> str:
    return value.replace("'", "''")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run_as_server_user(command: list[str]) -> None:
    if os.geteuid() == 0:
        command = ["runuser", "-u", SERVER_USER, "--", *command]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=START_TIMEOUT_SECONDS + 30,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} failed with exit code {result.returncode}:\n"
            f"{result.stdout}{result.stderr}"
        )


@dataclasses.dataclass(frozen=True)
class ExpectedSession:
    """A session that ``run_sessions`` opened, as the log should report it."""

    label: str
    pid: int
    user: str
    database: str
    end_reason: str
    held_seconds: float = 0.0


@dataclasses.dataclass
class Scenario:
    """The sessions ``run_sessions`` opened and the wall-clock span they took."""

    sessions: list[ExpectedSession]
    started_at: datetime
    finished_at: datetime

    def by_label(self, label: str) -> ExpectedSession:
        return next(session for session in self.sessions if session.label == label)


HELD_SECONDS = 0.5
REUSE_GAP_SECONDS = 0.2
APP_USER = "svc_test"
APP_DATABASE = "org_test1"
MISSING_DATABASE = "org_missing"
# A statement with a newline and quotes, so the logged STATEMENT spans lines.
FAILING_STATEMENT = "select 1/0,\n  'it''s \"quoted\"' as label"


def run_sessions(server: PostgresServer) -> Scenario:
    """Open one session of each kind that the reader must tell apart.

    In order, it opens:

    * "setup", which creates the application role and database,
    * "held", held open over TCP for HELD_SECONDS,
    * "error", whose statement fails with an ERROR,
    * "terminated", ended by pg_terminate_backend with a FATAL,
    * "killer", the session that called pg_terminate_backend,
    * a connection attempt to a missing database, which logs a FATAL but no
      disconnection and so is no session,
    * "last", a plain session on the postgres database, opened
      REUSE_GAP_SECONDS after the failed attempt.
    """
    started_at = datetime.now(timezone.utc)
    sessions = []

    with server.connect() as setup:
        setup.execute(f"create role {APP_USER} login")
        setup.execute(f"create database {APP_DATABASE} owner {APP_USER}")
        sessions.append(ExpectedSession(
            "setup", setup.info.backend_pid, "postgres", "postgres", "client_disconnect",
        ))

    with server.connect(APP_DATABASE, APP_USER, tcp=True) as held:
        held.execute("select 1")
        time.sleep(HELD_SECONDS)
        sessions.append(ExpectedSession(
            "held", held.info.backend_pid, APP_USER, APP_DATABASE, "client_disconnect",
            held_seconds=HELD_SECONDS,
        ))

    with server.connect(APP_DATABASE, APP_USER) as failing:
        try:
            failing.execute(FAILING_STATEMENT)
        except psycopg.errors.DivisionByZero:
            pass
        else:
            raise AssertionError(f"{FAILING_STATEMENT!r} did not raise division by zero")
        sessions.append(ExpectedSession(
            "error", failing.info.backend_pid, APP_USER, APP_DATABASE, "user_error",
        ))

    victim = server.connect(APP_DATABASE, APP_USER)
    try:
        victim_pid = victim.info.backend_pid
        with server.connect() as killer:
            killer.execute("select pg_terminate_backend(%s)", [victim_pid])
            _wait_for_backend_exit(killer, victim_pid)
            sessions.append(ExpectedSession(
                "killer", killer.info.backend_pid, "postgres", "postgres", "client_disconnect",
            ))
    finally:
        victim.close()
    sessions.append(ExpectedSession(
        "terminated", victim_pid, APP_USER, APP_DATABASE, "fatal_error",
    ))

    # A connection that fails during startup logs a FATAL but no disconnection.
    try:
        server.connect(MISSING_DATABASE, APP_USER).close()
    except psycopg.OperationalError:
        pass
    else:
        raise AssertionError(f"connecting to {MISSING_DATABASE!r} did not fail")

    # Linux reuses a pid only after wrapping around pid_max, so a process with
    # a reused pid starts long after the previous owner exited. The reader
    # relies on that gap when log_connections is off.
    time.sleep(REUSE_GAP_SECONDS)
    with server.connect() as last:
        last.execute("select 1")
        sessions.append(ExpectedSession(
            "last", last.info.backend_pid, "postgres", "postgres", "client_disconnect",
        ))

    server.wait_for_disconnections(len(sessions))
    return Scenario(sessions, started_at, datetime.now(timezone.utc))


def _wait_for_backend_exit(connection, pid: int) -> None:
    deadline = time.monotonic() + LOG_WAIT_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        row = connection.execute(
            "select count(*) from pg_stat_activity where pid = %s", [pid]
        ).fetchone()
        if row[0] == 0:
            return
        time.sleep(0.05)
    raise TimeoutError(f"backend {pid} still running {LOG_WAIT_TIMEOUT_SECONDS} s after termination")
