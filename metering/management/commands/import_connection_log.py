import os
import sys
import time

from django.core.management.base import BaseCommand, CommandError

from billing_drain.selectors import delivered_totals, delivery_destinations, undelivered_counts
from metering.importer import ImportFailed, import_logs, load_worker_sizes, wait_until_applied
from metering.units import milli_to_decimal

FORMATS = {"auto": "auto", "stderr": "stderr", "csv": "csv", "csvlog": "csv", "json": "json", "jsonlog": "json"}


class Command(BaseCommand):
    help = (
        "Meter PostgreSQL server logs written with log_disconnections=on: each session becomes one "
        "connection end, billed once however often the same log is imported."
    )

    def add_arguments(self, parser):
        parser.add_argument("paths", nargs="+", metavar="PATH", help="Log files: stderr, csvlog or jsonlog, plain or gzip.")
        parser.add_argument("--sizes", required=True, metavar="SIZES.csv", help="Worker sizes, a CSV with header org,cores,memory.")
        parser.add_argument(
            "--org-from",
            choices=("database", "user"),
            default="database",
            help="Take the org from the session's database name (default) or user name.",
        )
        parser.add_argument(
            "--org-pattern",
            default=r"^org_(.+)$",
            help="Regular expression whose first group is the org id (default: ^org_(.+)$).",
        )
        parser.add_argument("--format", default="auto", help="Log format: auto (default), stderr, csv or json.")
        parser.add_argument(
            "--wait",
            type=int,
            metavar="SECONDS",
            help="Wait up to this many seconds for a worker to apply the sessions and a drain to deliver them, "
            "then print what was billed per org. Needs a running Celery worker and beat.",
        )

    def handle(self, *args, paths, sizes, org_from, org_pattern, format, wait=None, **options):
        if wait is not None and wait < 1:
            raise CommandError(f"invalid --wait {wait}; use a number of seconds of at least 1")
        if format not in FORMATS:
            raise CommandError(f"invalid --format {format!r}; use one of auto, stderr, csv, json")
        for path in paths:
            if os.path.isdir(path):
                raise CommandError(f"log path is a directory: {path}; give the log files themselves")
            if not os.path.isfile(path):
                raise CommandError(f"log file not found: {path}")
            if not os.access(path, os.R_OK):
                raise CommandError(f"log file not readable: {path}")

        self._sizes_by_path = {path: os.path.getsize(path) for path in paths}
        self._show_progress = sys.stderr.isatty()
        try:
            worker_sizes = load_worker_sizes(sizes)
            summary = import_logs(
                paths, worker_sizes, org_from, org_pattern, FORMATS[format], self._progress, keep_ids=wait is not None
            )
        except ImportFailed as error:
            raise CommandError(str(error)) from None
        if self._show_progress:
            sys.stderr.write("\n")
        if not summary.metered and summary.unmatched_names:
            seen = ", ".join(repr(name) for name, _ in summary.unmatched_names.most_common(5))
            raise CommandError(
                f"no session matched --org-pattern {org_pattern!r} on the {org_from} name; names seen: {seen}. "
                "Check --org-pattern and --org-from."
            )

        self.stdout.write(f"Sessions metered: {summary.metered}")
        skipped = sum(summary.skipped.values())
        self.stdout.write(f"Sessions skipped: {skipped}")
        for reason, count in sorted(summary.skipped.items()):
            self.stdout.write(f"  {reason}: {count}")
        if summary.sessions_by_org:
            width = max(3, *(len(org) for org in summary.sessions_by_org))
            self.stdout.write(f"  {'org':<{width}}  {'sessions':>8}  {'compute seconds':>16}")
            for org in sorted(summary.sessions_by_org):
                self.stdout.write(
                    f"  {org:<{width}}  {summary.sessions_by_org[org]:>8}  "
                    f"{milli_to_decimal(summary.compute_milli_by_org[org]):>16}"
                )
        self.stdout.write(
            f"Sent {summary.published_rows} sessions to the worker in {summary.published_messages} messages; "
            "they ship with the next drain. Sessions imported before are skipped by the worker, not billed again."
        )
        if wait is not None and summary.metered:
            self._wait_and_report(summary, wait)

    def _wait_and_report(self, summary, timeout_seconds):
        deadline = time.monotonic() + timeout_seconds
        self.stdout.write("Waiting for the worker to apply the sessions...")
        applied = wait_until_applied(summary.connection_ids, timeout_seconds)
        if applied < len(summary.connection_ids):
            raise CommandError(
                f"only {applied} of {len(summary.connection_ids)} sessions were applied within {timeout_seconds} s; "
                "is a Celery worker running on the same broker and database?"
            )

        orgs = list(summary.sessions_by_org)
        window = (orgs, summary.first_bucket, summary.last_bucket)
        self.stdout.write("Waiting for the drain to deliver them...")
        while True:
            pending = undelivered_counts(*window)
            if not pending.get("open") and not pending.get("sealed"):
                break
            if time.monotonic() >= deadline:
                raise CommandError(
                    f"{pending.get('open', 0)} open and {pending.get('sealed', 0)} sealed buckets were not delivered "
                    f"within {timeout_seconds} s; is Celery beat running, or run 'python manage.py drain_billing'"
                )
            time.sleep(1)

        delivered = delivered_totals(*window)
        width = max(3, *(len(org) for org in orgs))
        self.stdout.write("Billed (delivered events for these orgs and buckets):")
        self.stdout.write(f"  {'org':<{width}}  {'events':>6}  {'sessions':>8}  {'compute seconds':>16}")
        for org in sorted(delivered):
            events, connections, compute_milli = delivered[org]
            self.stdout.write(
                f"  {org:<{width}}  {events:>6}  {connections:>8}  {milli_to_decimal(compute_milli):>16}"
            )
        for destination in delivery_destinations(*window):
            self.stdout.write(f"Events went to: {destination}")
        if pending.get("rejected"):
            raise CommandError(f"{pending['rejected']} buckets were rejected by PostHog; see the admin's usage buckets")
        self.stdout.write(self.style.SUCCESS("Done."))

    def _progress(self, path, bytes_read):
        if not self._show_progress:
            return
        total = self._sizes_by_path.get(path) or 1
        width = 30
        filled = min(width, width * bytes_read // total)
        percent = min(100, 100 * bytes_read // total)
        sys.stderr.write(f"\r{os.path.basename(path)} [{'#' * filled}{'.' * (width - filled)}] {percent:3d}%")
        sys.stderr.flush()
