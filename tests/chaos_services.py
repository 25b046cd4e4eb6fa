"""Processes that the chaos harness starts, faults and stops: its own servers and the product's processes.

Every server listens on 127.0.0.1 only. PostgreSQL and Redis are private
instances in the run's temporary directory, never the machine's shared ones,
so the harness can kill, freeze and restart them freely. Each process handle
signals only the process id it started.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_USER = "postgres"
LOOPBACK = "127.0.0.1"


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def wait_for(condition, timeout, interval=0.05):
    """Poll ``condition`` until it returns a truthy value or ``timeout`` seconds pass, and return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def unavailable_reason():
    """Return why the harness cannot run on this machine, or None when it can."""
    for program in ("initdb", "pg_ctl", "postgres"):
        if not (PG_BIN / program).exists():
            return f"{PG_BIN / program} is missing (install the postgresql-15 package)"
    if shutil.which("redis-server") is None:
        return "redis-server is missing (install the redis-server package)"
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            return "running as root, but runuser is missing to run PostgreSQL as the postgres user"
        try:
            pwd.getpwnam(PG_USER)
        except KeyError:
            return f"running as root, but there is no {PG_USER!r} user to run PostgreSQL"
    return None


class PostgresCluster:
    """A PostgreSQL 15 cluster in ``directory``, on a free 127.0.0.1 port and a unix socket in that directory."""

    def __init__(self, directory):
        self.directory = Path(directory)
        self.data_dir = self.directory / "data"
        self.port = free_port()
        self.restarts = 0

    def url(self, database):
        return f"postgres://{PG_USER}@{LOOPBACK}:{self.port}/{database}"

    def start(self):
        self.directory.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.directory, user=PG_USER)
        self._run(
            PG_BIN / "initdb", "-D", self.data_dir, "-U", PG_USER, "-A", "trust", "-E", "UTF8",
            "--locale=C", "--no-sync",
        )
        settings = {
            "listen_addresses": LOOPBACK,
            "port": str(self.port),
            "unix_socket_directories": str(self.directory),
            "fsync": "off",
            "max_connections": "100",
            "logging_collector": "off",
        }
        with open(self.data_dir / "postgresql.auto.conf", "a") as conf:
            conf.writelines(f"{name} = '{value}'\n" for name, value in settings.items())
        self._pg_ctl("start", "-l", self.directory / "server.log")

    def create_database(self, name):
        import psycopg

        with psycopg.connect(host=LOOPBACK, port=self.port, user=PG_USER, dbname="postgres", autocommit=True) as db:
            db.execute(f'CREATE DATABASE "{name}"')

    def restart(self, mode):
        """Restart with ``pg_ctl restart -m mode``: fast rolls back open transactions, immediate crashes."""
        self.restarts += 1
        self._pg_ctl("restart", "-m", mode, "-l", self.directory / "server.log")

    def is_running(self):
        result = subprocess.run(self._as_server_user(PG_BIN / "pg_ctl", "-D", self.data_dir, "status"),
                                capture_output=True, timeout=30)
        return result.returncode == 0

    def ensure_running(self):
        if not self.is_running():
            self._pg_ctl("start", "-l", self.directory / "server.log")

    def stop(self):
        """Stop the cluster with a fast shutdown. Never raises."""
        try:
            if self.data_dir.exists() and self.is_running():
                self._pg_ctl("stop", "-m", "fast")
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            print(f"chaos: stopping PostgreSQL in {self.directory} failed: {error}", file=sys.stderr)

    def _pg_ctl(self, action, *args):
        self._run(PG_BIN / "pg_ctl", "-D", self.data_dir, "-w", "-t", "60", action, *args)

    def _as_server_user(self, *command):
        command = [str(part) for part in command]
        if os.geteuid() == 0:
            command = ["runuser", "-u", PG_USER, "--", *command]
        return command

    def _run(self, *command):
        argv = self._as_server_user(*command)
        result = subprocess.run(argv, capture_output=True, text=True, timeout=90, cwd="/")
        if result.returncode != 0:
            output = f"{result.stdout}{result.stderr}"
            raise RuntimeError(f"{' '.join(argv)} failed with exit code {result.returncode}:\n{output}")


class RedisServer:
    """A redis-server child process on a free 127.0.0.1 port, without automatic snapshots.

    ``stop()`` shuts down with ``SHUTDOWN SAVE`` and ``start()`` loads that
    snapshot, which models a restart of a Redis with persistence. Without it,
    a restart would drop every queued message, and no client could recover
    messages that a broker discarded after accepting them.
    """

    def __init__(self, directory):
        self.directory = Path(directory)
        self.port = free_port()
        self.process = None
        self.frozen = False
        self._log = None

    @property
    def url(self):
        return f"redis://{LOOPBACK}:{self.port}/0"

    def start(self):
        self.directory.mkdir(parents=True, exist_ok=True)
        self._log = open(self.directory / "redis.out", "ab")
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no",
             "--dir", str(self.directory), "--logfile", str(self.directory / "redis.log")],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        if not wait_for(self.answers, 15):
            raise RuntimeError(f"redis-server on port {self.port} did not answer within 15 s")

    def client(self, timeout=2.0):
        import redis

        return redis.Redis(host=LOOPBACK, port=self.port, socket_timeout=timeout, socket_connect_timeout=timeout)

    def answers(self):
        try:
            with self.client(0.5) as client:
                return client.ping()
        except Exception:  # noqa: BLE001 - any failure means "not answering yet"
            return False

    def is_running(self):
        return self.process is not None and self.process.poll() is None

    def freeze(self):
        os.kill(self.process.pid, signal.SIGSTOP)
        self.frozen = True

    def thaw(self):
        if self.frozen and self.is_running():
            os.kill(self.process.pid, signal.SIGCONT)
        self.frozen = False

    def stop(self):
        """Shut down with SHUTDOWN SAVE so the restart finds every queued message. Never raises."""
        if not self.is_running():
            return
        self.thaw()
        subprocess.run(["redis-cli", "-h", LOOPBACK, "-p", str(self.port), "shutdown", "save"],
                       capture_output=True, timeout=15)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def close(self):
        """Stop for good: thaw first, then terminate. Never raises."""
        if self.process is not None and self.process.poll() is None:
            self.thaw()
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        if self._log:
            self._log.close()


class ManagedProcess:
    """One child process with its output in a log file, signalled only by its own pid."""

    def __init__(self, name, argv, env, log_path, stdin=False, stdout_lines=False):
        self.name = name
        self.argv = [str(part) for part in argv]
        self.env = env
        self.log_path = Path(log_path)
        self.use_stdin = stdin
        self.stdout_lines = stdout_lines
        self.process = None
        self.lines = []
        self._log = None
        self._reader = None

    def start(self):
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            self.argv,
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.PIPE if self.use_stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE if self.stdout_lines else self._log,
            stderr=self._log,
            start_new_session=True,
        )
        if self.stdout_lines:
            self._reader = threading.Thread(target=self._read_stdout, name=f"{self.name}-stdout", daemon=True)
            self._reader.start()
        return self

    def _read_stdout(self):
        for line in self.process.stdout:
            self.lines.append(line.decode("utf-8", "replace").rstrip("\n"))

    @property
    def pid(self):
        return self.process.pid if self.process else None

    def alive(self):
        return self.process is not None and self.process.poll() is None

    def send_line(self, text):
        """Write one line to the child's stdin. Return False when the child is gone."""
        try:
            self.process.stdin.write(text.encode("utf-8") + b"\n")
            self.process.stdin.flush()
            return True
        except (BrokenPipeError, OSError, ValueError):
            return False

    def signal(self, sig):
        if self.alive():
            try:
                os.kill(self.process.pid, sig)
            except ProcessLookupError:
                pass

    def wait(self, timeout):
        """Wait for the exit and return the exit code, or None on timeout."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self):
        self.signal(signal.SIGKILL)
        if self.process is not None:
            self.wait(10)

    def terminate(self, timeout=15):
        """Send SIGTERM, then SIGKILL after ``timeout`` seconds, and return the exit code. Never raises."""
        if self.process is None:
            return None
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        code = self.wait(timeout)
        if code is None:
            self.kill()
            code = self.process.returncode
        self.close_log()
        return code

    def close_log(self):
        if self._log:
            self._log.close()
            self._log = None


class CeleryWorker(ManagedProcess):
    """A ``celery worker -P solo`` on the run's queue, loading the harness's pause points."""

    def __init__(self, slot, env, log_dir):
        self.slot = slot
        self.starts = 0
        super().__init__(
            f"worker-{slot}",
            [sys.executable, "-m", "celery", "-A", "settings.celery", "worker", "-P", "solo", "-l", "info",
             "--without-heartbeat", "--without-gossip", "--without-mingle", "-n", f"chaos{slot}@%h",
             "--include", "tests.chaos_hooks"],
            {**env, "CHAOS_ROLE": "worker"},
            Path(log_dir) / f"worker-{slot}.log",
        )

    def start(self):
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== chaos: start {self.starts} of worker {self.slot} ===\n".encode())
        return super().start()

    def ready(self):
        """Return True once this start of the worker logged that it is ready."""
        marker = f"=== chaos: start {self.starts} of worker {self.slot} ===".encode()
        text = self.log_path.read_bytes()
        return b"ready." in text[text.rfind(marker):]


class CaptureProcess(ManagedProcess):
    """The PostHog stand-in, ``python -m tests.capture_server``, with faults set over ``POST /_control``."""

    def __init__(self, directory, api_key):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.state_file = self.directory / "state.json"
        self.url = None
        super().__init__(
            "capture",
            [sys.executable, "-m", "tests.capture_server", "--port", "0", "--dir", self.directory,
             "--state-file", self.state_file, "--api-key", api_key, "--log-level", "WARNING"],
            dict(os.environ),
            self.directory / "capture.log",
        )

    def start(self):
        super().start()
        if not wait_for(self.state_file.exists, 15):
            raise RuntimeError(f"the capture server did not start; see {self.log_path}")
        self.url = json.loads(self.state_file.read_text())["url"]
        return self

    def control(self, action, **fields):
        from tests.capture_server import send_control

        return send_control(self.url, action, **fields)

    @property
    def events_file(self):
        return self.directory / "events.jsonl"

    @property
    def requests_file(self):
        return self.directory / "requests.jsonl"
