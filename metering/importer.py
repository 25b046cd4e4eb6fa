"""Meter PostgreSQL server logs: each logged session becomes one connection end.

Sessions go through the same metering client as live traffic, each with a
connection id built from the log, so importing the same file twice bills
once. The importer keeps its own totals only to print a summary.
"""

import collections
import csv
import logging
import re
import time
from dataclasses import dataclass, field

from django.conf import settings

from metering import units
from metering.client import MeteringClient
from metering.confirmations import confirmations_from_settings
from metering.connection_log import LogFormatError, ReadStats, read_sessions

logger = logging.getLogger(__name__)

# Publish every this many sessions, so memory stays flat however large the log.
FLUSH_EVERY_SESSIONS = 5000


class ImportFailed(Exception):
    """The import cannot start or finish; the message names what to fix."""


@dataclass
class ImportSummary:
    metered: int = 0
    skipped: collections.Counter = field(default_factory=collections.Counter)
    compute_milli_by_org: collections.Counter = field(default_factory=collections.Counter)
    sessions_by_org: collections.Counter = field(default_factory=collections.Counter)
    unparseable_lines: int = 0
    published_rows: int = 0
    published_messages: int = 0
    unmatched_names: collections.Counter = field(default_factory=collections.Counter)
    first_bucket: int | None = None
    last_bucket: int | None = None
    connection_ids: list | None = None


def load_worker_sizes(path):
    """Read ``org,cores,memory`` rows into {org: (cores, memory)}; raises ImportFailed naming a bad row."""
    try:
        with open(path, newline="", encoding="utf-8") as sizes_file:
            reader = csv.DictReader(sizes_file)
            missing = {"org", "cores", "memory"} - set(reader.fieldnames or [])
            if missing:
                raise ImportFailed(
                    f"{path}: missing column(s) {', '.join(sorted(missing))}; the header must be org,cores,memory"
                )
            sizes = {}
            for line_number, row in enumerate(reader, start=2):
                org = (row["org"] or "").strip()
                if not org:
                    raise ImportFailed(f"{path}:{line_number}: empty org")
                if org in sizes:
                    raise ImportFailed(f"{path}:{line_number}: org {org!r} is listed twice; keep one size per org")
                try:
                    units.parse_worker_size(row["cores"] or "", row["memory"] or "")
                except units.InvalidUsage as error:
                    raise ImportFailed(f"{path}:{line_number}: {error}") from None
                sizes[org] = (row["cores"].strip(), row["memory"].strip())
    except OSError as error:
        raise ImportFailed(f"cannot read worker sizes {path}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise ImportFailed(f"cannot read worker sizes {path}: not UTF-8 text ({error})") from None
    if not sizes:
        raise ImportFailed(f"{path} lists no worker sizes; add rows such as 'acme,8,16Gi'")
    return sizes


def compile_org_pattern(pattern):
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        raise ImportFailed(f"invalid --org-pattern {pattern!r}: {error}") from None
    if compiled.groups < 1:
        raise ImportFailed(f"invalid --org-pattern {pattern!r}: it needs a group that captures the org id")
    return compiled


def new_import_client():
    return MeteringClient(
        bucket_seconds=settings.METERING_BUCKET_SECONDS,
        memory_per_core_gib=settings.METERING_MEMORY_PER_CORE_GIB,
        max_connection_seconds=settings.METERING_MAX_CONNECTION_SECONDS,
        rows_per_message=settings.METERING_ROWS_PER_MESSAGE,
        publish_timeout_seconds=settings.METERING_PUBLISH_TIMEOUT_SECONDS,
        max_pending_keys=max(settings.METERING_MAX_PENDING_KEYS, FLUSH_EVERY_SESSIONS * 2),
        confirmations=confirmations_from_settings(),
        confirm_seconds=settings.METERING_CONFIRM_SECONDS,
        exit_flush_seconds=settings.METERING_EXIT_FLUSH_SECONDS,
        register_exit_flush=False,
    )


def import_logs(
    paths, sizes, org_from="database", org_pattern=r"^org_(.+)$", log_format="auto", progress=None, keep_ids=False
):
    """Meter every session in the given logs; return an ImportSummary.

    Raises ImportFailed when a log cannot be read or the broker does not take
    the sessions; what was published before stays published, and re-running
    the import is safe because each session has a stable connection id.
    With ``keep_ids`` the summary lists every connection id sent, for
    ``wait_until_applied``; that list grows with the log.
    """
    pattern = compile_org_pattern(org_pattern)
    client = new_import_client()
    try:
        summary = _meter_sessions(client, paths, sizes, org_from, pattern, log_format, progress, keep_ids)
        _flush(client)
    except BaseException:
        # A failed import must not go on publishing what it left pending; running it again sends all of it.
        client.stop()
        raise
    # Wait, as a process exit does, for the workers to confirm what was sent; a batch the broker lost is sent again.
    client.close()
    stats = client.stats()
    summary.published_rows = stats.get("published_rows", 0)
    summary.published_messages = stats.get("published_messages", 0)
    if stats.get("invalid"):
        raise ImportFailed(f"{stats['invalid']} sessions were rejected by the metering client; see the log above")
    return summary


def _meter_sessions(client, paths, sizes, org_from, pattern, log_format, progress, keep_ids):
    """Record every session of the logs through ``client``; return the summary so far."""
    summary = ImportSummary(connection_ids=[] if keep_ids else None)
    bucket_seconds = settings.METERING_BUCKET_SECONDS
    memory_per_core = settings.METERING_MEMORY_PER_CORE_GIB
    since_flush = 0

    for path in paths:
        for session in _read_path(path, log_format, progress, summary):
            name = session.database if org_from == "database" else session.user
            match = pattern.search(name or "")
            if match is None or not match.group(1):
                summary.skipped["no org match"] += 1
                if len(summary.unmatched_names) < 1000:
                    summary.unmatched_names[name] += 1
                continue
            org = match.group(1)
            if org not in sizes:
                summary.skipped[f"no size for org {org}"] += 1
                continue
            cores, memory = sizes[org]
            try:
                size = units.parse_worker_size(cores, memory)
                usage = units.connection_usage(size, session.duration, memory_per_core)
            except units.InvalidUsage as error:
                summary.skipped[f"invalid: {error}"] += 1
                continue
            client.record(
                org,
                cores,
                memory,
                ended_at=session.ended_at,
                duration_seconds=session.duration,
                end_reason=session.end_reason,
                connection_id=session.connection_id,
            )
            summary.metered += 1
            bucket = units.bucket_start_for(session.ended_at.timestamp(), bucket_seconds)
            summary.first_bucket = bucket if summary.first_bucket is None else min(summary.first_bucket, bucket)
            summary.last_bucket = bucket if summary.last_bucket is None else max(summary.last_bucket, bucket)
            if keep_ids:
                summary.connection_ids.append(session.connection_id)
            summary.sessions_by_org[org] += 1
            summary.compute_milli_by_org[org] += usage.compute_milli
            since_flush += 1
            if since_flush >= FLUSH_EVERY_SESSIONS:
                _flush(client)
                since_flush = 0

    return summary


def _read_path(path, log_format, progress, summary):
    stats = ReadStats()
    last_report = 0.0
    try:
        for session in read_sessions(path, log_format, stats):
            if progress and time.monotonic() - last_report > 0.2:
                progress(path, stats.bytes_read)
                last_report = time.monotonic()
            yield session
    except LogFormatError as error:
        raise ImportFailed(str(error)) from None
    finally:
        summary.unparseable_lines += stats.unparseable_lines
    if stats.unparseable_lines:
        summary.skipped["unparseable line"] += stats.unparseable_lines
    if progress:
        progress(path, stats.bytes_read)


def _flush(client):
    deadline = time.monotonic() + 60
    while not client.flush(deadline=deadline):
        if time.monotonic() >= deadline:
            raise ImportFailed(
                f"the Celery broker ({_broker_text()}) did not take {client.stats()['pending_rows']} sessions "
                "within 60 s; start it and run the import again (sessions already sent are not billed twice)"
            )
        time.sleep(1)


def _broker_text():
    url = settings.CELERY_BROKER_URL or ""
    # Drop any password from the URL before showing it.
    return re.sub(r"//[^@/]*@", "//***@", url)


def wait_until_applied(connection_ids, timeout_seconds, poll_seconds=1.0):
    """Wait until the worker has applied every connection id; return how many are applied."""
    from metering.buffer import connection_key
    from metering.models import AppliedMessage

    keys = [connection_key(connection_id) for connection_id in connection_ids]
    deadline = time.monotonic() + timeout_seconds
    while True:
        applied = sum(
            AppliedMessage.objects.filter(key__in=keys[start : start + 1000]).count()
            for start in range(0, len(keys), 1000)
        )
        if applied >= len(keys) or time.monotonic() >= deadline:
            return applied
        time.sleep(poll_seconds)
