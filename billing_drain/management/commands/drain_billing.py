from django.core.management.base import BaseCommand, CommandError

from billing_drain.services import DrainLockHeld, DrainLockUnavailable, drain_with_lock, pending_by_org
from billing_drain.transport import configured_transport
from metering.units import milli_to_decimal

EXIT_LOCK_HELD = 3


class Command(BaseCommand):
    help = (
        "Seal closed usage buckets and ship them to PostHog (or the local outbox) now. "
        "Exits 1 when any event could not be delivered, 3 when another drain holds the lock."
    )

    def add_arguments(self, parser):
        parser.add_argument("--dry-run", action="store_true", help="Show what would be shipped; change nothing.")
        parser.add_argument("--org", help="Drain only this org id.")
        parser.add_argument("--batch-size", type=int, help="Events per request (default: DRAIN_BATCH_SIZE).")

    def handle(self, *args, dry_run=False, org=None, batch_size=None, **options):
        if batch_size is not None and batch_size < 1:
            raise CommandError(f"--batch-size {batch_size} is invalid; use a whole number of at least 1")
        if org is not None and not org.strip():
            # An empty org id would otherwise mean "every org".
            raise CommandError(f"--org {org!r} is invalid; give an org id, or leave out --org to drain every org")
        destination = configured_transport().destination
        if dry_run:
            self._print_table("Would ship", pending_by_org(org_id=org), destination)
            return

        try:
            report = drain_with_lock(org_id=org, progress=self._progress, batch_size=batch_size)
        except DrainLockHeld as held:
            raise CommandError(
                f"Another drain is running ({held.holder}); nothing was done. Try again when it has finished.",
                returncode=EXIT_LOCK_HELD,
            ) from None
        except DrainLockUnavailable as error:
            raise CommandError(f"{error}; nothing was done. Check REDIS_URL and that Redis is running.") from None
        if self._progress_shown:
            self.stdout.write("")
        self._print_table("Delivered", report.delivered, report.destination)
        self.stdout.write(
            f"Sealed {report.sealed} buckets, delivered {report.delivered_events} events in "
            f"{report.requests} requests, {report.duration_ms} ms."
        )
        if not report.succeeded:
            for error in report.errors:
                self.stderr.write(self.style.ERROR(error))
            raise CommandError(
                f"{report.kept_for_retry} events kept for retry, {report.parked} parked as rejected; "
                "see the errors above and the admin's usage buckets."
            )
        self.stdout.write(self.style.SUCCESS("Drain succeeded."))

    _progress_shown = False

    def _progress(self, done, total):
        if total <= 0:
            return
        if not self.stdout.isatty() and total < 10_000:
            return
        self._progress_shown = True
        width = 30
        filled = width * done // total
        end = "\r" if self.stdout.isatty() else "\n"
        self.stdout.write(f"shipping [{'#' * filled}{'.' * (width - filled)}] {done}/{total} events", ending=end)
        self.stdout.flush()

    def _print_table(self, title, totals_by_org, destination):
        self.stdout.write(f"{title} to {destination}:")
        if not totals_by_org:
            self.stdout.write("  nothing")
            return
        width = max(3, *(len(org) for org in totals_by_org))
        self.stdout.write(f"  {'org':<{width}}  {'events':>8}  {'connections':>11}  {'compute seconds':>18}")
        for org in sorted(totals_by_org):
            totals = totals_by_org[org]
            self.stdout.write(
                f"  {org:<{width}}  {totals.events:>8}  {totals.connections:>11}  "
                f"{milli_to_decimal(totals.compute_milli):>18}"
            )
