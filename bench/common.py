"""Set-up shared by the benchmarks: environment, Django, services, statistics and output.

``prepare()`` must run before anything imports Django models, because the
project's settings read DATABASE_URL and CELERY_BROKER_URL at import time.
"""

import argparse
import contextlib
import dataclasses
import logging
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/metering_bench"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/14"
CAPTURE_API_KEY = "phc_bench_key"
BENCH_TABLES = (
    "metering_usagebucket",
    "metering_appliedmessage",
    "billing_drain_deliveredevent",
)

_data_dir = None


def add_common_arguments(parser):
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_DATABASE_URL", DEFAULT_DATABASE_URL),
        help="PostgreSQL database the benchmarks own; created and migrated when missing, and its "
        f"buffer tables are emptied (default {DEFAULT_DATABASE_URL}, or BENCH_DATABASE_URL)",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS_URL),
        help="Redis database used as the Celery broker; only keys of the benchmark's own queues are "
        f"deleted (default {DEFAULT_REDIS_URL}, or BENCH_REDIS_URL)",
    )


def prepare(args):
    """Point the project's settings at the benchmark database and broker, then set up Django."""
    global _data_dir
    if _data_dir is None:
        _data_dir = Path(tempfile.mkdtemp(prefix="metering-bench-"))
    os.environ["DATABASE_URL"] = args.database_url
    os.environ["CELERY_BROKER_URL"] = args.redis_url
    os.environ["REDIS_URL"] = args.redis_url
    os.environ["METERING_DATA_DIR"] = str(_data_dir / "var")
    os.environ["DJANGO_SETTINGS_MODULE"] = "settings"
    # The drain logs a line per run at INFO; the figures are easier to read without them.
    os.environ.setdefault("METERING_LOG_LEVEL", "WARNING")
    os.environ.pop("POSTHOG_API_KEY", None)
    os.environ.pop("CELERY_BROKER_WRITE_URL", None)

    _create_database(args.database_url)
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)


def setup_child_process():
    """Set up Django in a process started by multiprocessing's spawn, which inherits the environment."""
    import django

    django.setup()


def data_dir():
    """Return the temporary directory of this run, for logs and capture files."""
    return _data_dir


def remove_data_dir():
    global _data_dir
    if _data_dir is not None:
        shutil.rmtree(_data_dir, ignore_errors=True)
        _data_dir = None


def _create_database(database_url):
    import psycopg
    from psycopg import conninfo, sql

    name = conninfo.conninfo_to_dict(database_url).get("dbname")
    if not name:
        raise SystemExit(f"--database-url {database_url!r} names no database; add one, e.g. /metering_bench")
    server = conninfo.make_conninfo(database_url, dbname="postgres")
    try:
        with psycopg.connect(server, autocommit=True, connect_timeout=10) as connection:
            exists = connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
            if not exists:
                connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.OperationalError as error:
        raise SystemExit(
            f"could not connect to PostgreSQL for {database_url!r}: {error}; start it "
            "(bin/run-tests does) or pass --database-url"
        ) from None


def clear_tables(*extra_tables):
    """Empty the buffer, the message ids and the ledger in the benchmark database."""
    from django.db import connection

    tables = ", ".join((*BENCH_TABLES, *extra_tables))
    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {tables}")


def wal_position():
    """Return PostgreSQL's current WAL write position in bytes (pg_current_wal_lsn)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')")
        return int(cursor.fetchone()[0])


def table_bytes(table):
    """Return a table's size with its indexes and TOAST (pg_total_relation_size) and its row count."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(f"SELECT pg_total_relation_size(%s), (SELECT count(*) FROM {table})", [table])
        return cursor.fetchone()


# Broker helpers.


def celery_app(broker_url, name="bench"):
    """Return a Celery app with the project's settings that publishes to ``broker_url``.

    Celery prefers the CELERY_BROKER_URL environment variable over the app's
    broker_url, but its producer pool connects to broker_write_url when set.
    """
    from celery import Celery

    app = Celery(name, set_as_current=False)
    app.config_from_object("django.conf:settings", namespace="CELERY")
    app.conf.broker_write_url = broker_url
    return app


def redis_client(redis_url):
    import redis

    return redis.Redis.from_url(redis_url, socket_timeout=10)


def delete_queue_keys(redis_url, queue):
    """Delete a benchmark queue's list and its binding entries; other keys stay."""
    client = redis_client(redis_url)
    try:
        client.delete(queue)
        for key in client.scan_iter(match="_kombu.binding.*"):
            for member in client.smembers(key):
                if queue.encode() in member:
                    client.srem(key, member)
    finally:
        client.close()


def queue_length(redis_url, queue):
    client = redis_client(redis_url)
    try:
        return client.llen(queue)
    finally:
        client.close()


def key_memory(redis_url, key):
    """Return the bytes Redis reports for a key with MEMORY USAGE (all elements sampled)."""
    client = redis_client(redis_url)
    try:
        return client.memory_usage(key, samples=0) or 0
    finally:
        client.close()


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PrivateRedis:
    """A redis-server of this benchmark on a free 127.0.0.1 port, to stop or freeze at will."""

    def __init__(self, directory):
        self.directory = Path(directory)
        self.port = None
        self.process = None

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self):
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--bind", "127.0.0.1",
                "--port", str(self.port),
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.directory),
                "--logfile", str(self.directory / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while True:
            try:
                client = redis_client(self.url)
                client.ping()
                client.close()
                return self
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"redis-server on port {self.port} did not start; see {self.directory}")
                time.sleep(0.05)

    def freeze(self):
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self):
        self.process.send_signal(signal.SIGCONT)

    def stop(self):
        """Resume the server if frozen and terminate it. Never raises."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        except OSError:
            pass


# The capture server.


class CaptureProcess:
    """The capture server (bench.capture) in a process of its own, so it does not share the drain's GIL.

    With ``nagle=True`` the test server keeps Nagle's algorithm on, which adds
    a delayed-ACK wait of up to 40 ms to each request (see bench/capture.py).
    """

    def __init__(self, directory, nagle=False):
        self.directory = directory
        self.nagle = nagle
        self.process = None
        self.url = None

    def __enter__(self):
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "bench.capture", "--port", "0", "--dir", str(self.directory),
                "--api-key", CAPTURE_API_KEY, "--log-level", "WARNING", *(["--nagle"] if self.nagle else []),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.url = self.process.stdout.readline().strip()
        if not self.url.startswith("http://127.0.0.1:"):
            self.__exit__()
            raise RuntimeError(f"the capture server did not start; it printed {self.url!r}")
        return self

    def __exit__(self, *exc_info):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def events(self):
        from tests.capture_server import read_jsonl

        return read_jsonl(self.directory / "events.jsonl")


# Celery workers.


def worker_environment(queue):
    env = dict(os.environ)
    env["CELERY_QUEUE"] = queue
    return env


def start_workers(count, queue, name):
    """Start ``count`` real ``celery worker -P solo`` processes on ``queue``; return them."""
    from tests.processes import CeleryProcess

    workers = []
    try:
        for index in range(count):
            log_path = data_dir() / f"{name}-worker-{index}.log"
            workers.append(CeleryProcess("worker", worker_environment(queue), log_path).start())
    except Exception:
        stop_workers(workers)
        raise
    return workers


def stop_workers(workers):
    for worker in workers:
        worker.stop()


def rss_bytes(pid):
    """Return the resident set size of a process from /proc, or None when it has exited."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


@contextlib.contextmanager
def quiet_logger(name):
    """Hide a logger's records below CRITICAL inside the block, for failures a benchmark causes on purpose."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


# Statistics.


def percentile(sorted_values, fraction):
    """Return the nearest-rank percentile of already sorted values (fraction 0.5 is the median)."""
    if not sorted_values:
        raise ValueError("no values to take a percentile of")
    rank = max(1, -(-len(sorted_values) * fraction // 1))
    return sorted_values[min(len(sorted_values), int(rank)) - 1]


# Output.


@dataclasses.dataclass
class Result:
    """One measured figure, its baseline from the same run and the target it is checked against."""

    benchmark: str
    figure: str
    value: float
    unit: str
    baseline: float = None
    ratio: float = None
    target: str = ""
    passed: bool = None

    def verdict(self):
        if self.passed is None:
            return ""
        return "pass" if self.passed else "FAIL"


def format_number(value):
    if value is None:
        return "-"
    if isinstance(value, float) and not value.is_integer():
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:,.2f}"
    return f"{int(value):,}"


def print_results(results, title="Results"):
    rows = [("benchmark", "figure", "value", "unit", "baseline", "ratio", "target", "verdict")]
    for result in results:
        rows.append(
            (
                result.benchmark,
                result.figure,
                format_number(result.value),
                result.unit,
                format_number(result.baseline),
                "-" if result.ratio is None else f"{result.ratio:.2f}",
                result.target,
                result.verdict(),
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    print(f"\n{title}")
    for index, row in enumerate(rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        if index == 0:
            print("  ".join("-" * width for width in widths))
    sys.stdout.flush()


def machine_summary():
    """Return the machine facts a reader needs to compare figures: cores, CPU model, memory, versions."""
    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 2**20:.1f} GiB"
                break
    except OSError:
        pass
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "memory": memory,
        "python": platform.python_version(),
        "postgresql": _command_output(["psql", "--version"]),
        "redis": _command_output(["redis-server", "--version"]),
        "commit": _commit_description(),
        "load_average": " ".join(f"{value:.2f}" for value in os.getloadavg()),
    }


def _commit_description():
    commit = _command_output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    changed = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    ).stdout.strip()
    return f"{commit} with uncommitted changes" if changed else commit


def _command_output(command):
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def print_machine():
    facts = machine_summary()
    print(
        f"machine: nproc={facts['nproc']}, CPU {facts['cpu_model']}, {facts['memory']} RAM, "
        f"Python {facts['python']}, {facts['postgresql']}, {facts['redis']}, commit {facts['commit']}, "
        f"load average {facts['load_average']}"
    )
    sys.stdout.flush()


def new_parser(prog, description):
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_common_arguments(parser)
    return parser


def run_main(argv, prog, description, add_arguments, run):
    """Parse a benchmark's options, run it, and print its results."""
    parser = new_parser(prog, description)
    add_arguments(parser)
    args = parser.parse_args(argv)
    prepare(args)
    print_machine()
    try:
        results = run(args)
    finally:
        remove_data_dir()
    print_results(results)
