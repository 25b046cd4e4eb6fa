"""The drain: seal closed buckets, ship sealed rows, delete them once confirmed.

Invariants that keep billing exact:
- Sealing (billing_drain.sealing) changes a row from open to sealed under a
  row lock and gives it a generation one above any earlier row of the same
  (org, bucket). Increments only ever touch open rows, so a sealed row's
  content is final.
- The event uuid is derived from (org, bucket_start, generation), so shipping
  the same row twice (a crash after the 2xx, two overlapping drains) sends the
  same uuid, which PostHog folds into one event.
- A row is deleted only after a confirmed 200, in the same transaction that
  writes its DeliveredEvent.
"""

import collections
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Count, Q, Sum
from django.utils import timezone as django_timezone

from billing_drain.events import build_events
from billing_drain.lock import DrainLockUnavailable, drain_lock
from billing_drain.models import DeliveredEvent
from billing_drain.sealing import SealAhead, closed_open_rows, seal_closed_buckets
from billing_drain.transport import BatchRejected, BatchTooLarge, DeliveryFailed, configured_transport
from metering.buffer import delete_expired_message_keys
from metering.models import REASON_COLUMNS, UsageBucket
from metering.units import END_REASONS

logger = logging.getLogger(__name__)

_MAX_ERROR_LENGTH = 2000


class DrainLockHeld(Exception):
    def __init__(self, holder):
        super().__init__(f"another drain holds the lock: {holder or 'unknown holder'}")
        self.holder = holder


@dataclass
class OrgTotals:
    events: int = 0
    compute_milli: int = 0
    connections: int = 0


@dataclass
class DrainReport:
    destination: str = ""
    sealed: int = 0
    delivered: dict = field(default_factory=lambda: collections.defaultdict(OrgTotals))
    kept_for_retry: int = 0
    parked: int = 0
    requests: int = 0
    errors: list = field(default_factory=list)
    lock_lost: bool = False
    duration_ms: int = 0

    @property
    def delivered_events(self):
        return sum(totals.events for totals in self.delivered.values())

    @property
    def succeeded(self):
        return not self.errors and self.kept_for_retry == 0 and self.parked == 0 and not self.lock_lost


class _StopShipping(Exception):
    pass


def _now():
    return django_timezone.now()


_SHIPPED_FIELDS = (
    "id",
    "org_id",
    "bucket_start",
    "bucket_seconds",
    "generation",
    "event_uuid",
    "compute_milli",
    "cpu_milli",
    "memory_milli",
    "connections",
    "attempts",
    *REASON_COLUMNS,
)
_FIRST_REASON = _SHIPPED_FIELDS.index(REASON_COLUMNS[0])


class SealedRow(collections.namedtuple("SealedRow", _SHIPPED_FIELDS)):
    """The columns of a sealed buffer row that shipping reads.

    It is a tuple rather than a UsageBucket because building model instances
    took about 60 % of the time spent fetching rows, in a cProfile run of a
    10,000-event drain.
    """

    __slots__ = ()

    def end_reasons(self):
        return dict(zip(END_REASONS, self[_FIRST_REASON:]))


def ship_sealed(
    report,
    transport,
    now=None,
    org_id=None,
    batch_size=None,
    keep_lock=None,
    progress=None,
    row_ids=None,
    sealer=None,
):
    """Ship sealed rows that are due, page by page; fills ``report``.

    Stops at the first failure that is not about one event (network, 5xx,
    429, auth): the rows keep their state with a backoff, and the next drain
    retries them. ``keep_lock`` is called after each page's response and
    before the next page is sent. When it returns False the lock was lost, so
    shipping stops early (billing stays correct either way). With
    ``row_ids``, only those rows are shipped, whatever their backoff.

    With a ``sealer`` (a SealAhead), closed buckets are sealed a chunk ahead
    of the pages, while requests are in flight, and whatever is left is
    sealed before this returns, whether shipping succeeded or not.
    """
    now = now or _now()
    batch_size = batch_size or settings.DRAIN_BATCH_SIZE
    due = _due_rows(now, org_id, row_ids)
    total = due.count() + (sealer.pending_rows() if sealer is not None else 0)
    counter = _ProgressCounter(progress, total)

    failed_after_id = _ship_pages(due, 0, batch_size, transport, report, now, keep_lock, counter, sealer)
    if failed_after_id is None and not report.lock_lost and sealer is not None and sealer.sealed_behind:
        # A row an increment held locked was sealed after the pages had passed
        # its id. Nothing is in flight now, so start again from the lowest id.
        failed_after_id = _ship_pages(due, 0, batch_size, transport, report, now, keep_lock, counter, None)

    if sealer is not None:
        sealer.seal_rest()
    if failed_after_id is not None:
        report.kept_for_retry += due.filter(id__gt=failed_after_id).count()


class _ProgressCounter:
    """Events shipped so far, passed to the caller's progress callback after each page."""

    def __init__(self, progress, total):
        self.progress = progress
        self.total = total
        self.done = 0

    def add(self, events):
        self.done += events
        if self.progress:
            # Rows sealed or made due after the count was taken can push done past it.
            self.progress(self.done, max(self.total, self.done))


def _ship_pages(due, after_id, batch_size, transport, report, now, keep_lock, counter, sealer):
    """Ship the due rows with an id above ``after_id``. Return the last id of a page that failed, else None.

    One page's request is in flight in a sender thread while this thread
    seals ahead, fetches and builds the next page and moves the previous one
    to the ledger. The sender thread only calls ``transport.send``, and every
    database statement runs here, on this thread's connection. A page's rows
    are deleted only after its own request returned 200, and at most one
    request is in flight.
    """
    page = _next_page(due, after_id, batch_size, sealer)
    if not page:
        return None
    # Leaving the block waits for a request still in flight, so no request
    # outlives this call, even when a database statement here raises.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="drain-sender") as sender:
        report.requests += 1
        in_flight = sender.submit(transport.send, build_events(page))
        while True:
            next_page = _next_page(due, page[-1].id, batch_size, sealer)
            next_events = build_events(next_page)

            try:
                in_flight.result()
            except (BatchTooLarge, BatchRejected) as error:
                confirmed = False
                try:
                    _split_or_park(page, error, transport, report, now)
                except _StopShipping:
                    return page[-1].id
            except DeliveryFailed as error:
                _keep_for_retry(page, error, report, now)
                return page[-1].id
            else:
                confirmed = True

            # Check the lock before the next request, as a drain without a
            # sender thread would between two pages.
            lock_kept = keep_lock is None or keep_lock()
            if next_page and lock_kept:
                report.requests += 1
                in_flight = sender.submit(transport.send, next_events)
            if confirmed:
                mark_delivered(page, transport.destination, report)
            counter.add(len(page))
            if not lock_kept:
                report.lock_lost = True
                report.errors.append("the drain lock was lost; stopped shipping, the next drain goes on")
                return None
            if not next_page:
                return None
            page = next_page


def _next_page(due, after_id, batch_size, sealer):
    """Seal at least a page of rows ahead when there is a sealer, then fetch the next page.

    Returns an empty list only when no due row is left above ``after_id`` and
    nothing is left to seal.
    """
    while True:
        if sealer is not None:
            sealer.seal(batch_size, after_id)
        page = _fetch_page(due, after_id, batch_size)
        if page or sealer is None or sealer.finished:
            return page


def _fetch_page(due, after_id, batch_size):
    """Return up to ``batch_size`` due rows with an id above ``after_id``, as SealedRows in id order."""
    return [
        SealedRow._make(values)
        for values in due.filter(id__gt=after_id).order_by("id").values_list(*_SHIPPED_FIELDS)[:batch_size]
    ]


def _due_rows(now, org_id, row_ids=None):
    due = UsageBucket.objects.filter(state=UsageBucket.State.SEALED)
    if row_ids is not None:
        due = due.filter(id__in=row_ids)
    else:
        due = due.filter(Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=now))
    if org_id:
        due = due.filter(org_id=org_id)
    return due


def _deliver(rows, transport, report, now):
    """Send rows in one request and wait for the response. Split on 413, bisect on 400, park single bad events."""
    report.requests += 1
    try:
        transport.send(build_events(rows))
    except (BatchTooLarge, BatchRejected) as error:
        _split_or_park(rows, error, transport, report, now)
        return
    except DeliveryFailed as error:
        _keep_for_retry(rows, error, report, now)
        raise _StopShipping() from error
    mark_delivered(rows, transport.destination, report)


def _split_or_park(rows, error, transport, report, now):
    """Park a single event that got a 413 or 400, or deliver each half of a larger batch on its own.

    Raises _StopShipping when a half fails as a whole.
    """
    if len(rows) == 1:
        _park(rows[0], error, report)
        return
    middle = len(rows) // 2
    logger.info("splitting a batch of %s events after: %s", len(rows), error)
    _deliver(rows[:middle], transport, report, now)
    _deliver(rows[middle:], transport, report, now)


def mark_delivered(rows, destination, report):
    """Delete delivered rows and write their ledger entries in one transaction.

    Only rows that are still sealed count as delivered: a row another drain
    already moved to the ledger, or an operator parked, is left alone.
    """
    delivered_at = _now()
    with transaction.atomic():
        if connection.vendor == "postgresql":
            still_sealed = _move_to_ledger([row.id for row in rows], destination[:300], delivered_at)
        else:
            still_sealed = set(
                UsageBucket.objects.select_for_update()
                .filter(id__in=[row.id for row in rows], state=UsageBucket.State.SEALED)
                .values_list("id", flat=True)
            )
            UsageBucket.objects.filter(id__in=list(still_sealed)).delete()
            _write_ledger([row for row in rows if row.id in still_sealed], destination[:300], delivered_at)
        delivered = [row for row in rows if row.id in still_sealed]
    for row in delivered:
        totals = report.delivered[row.org_id]
        totals.events += 1
        totals.compute_milli += row.compute_milli
        totals.connections += row.connections


_LEDGER_ROW_FIELDS = (
    "event_uuid",
    "org_id",
    "bucket_start",
    "bucket_seconds",
    "generation",
    "compute_milli",
    "cpu_milli",
    "memory_milli",
    "connections",
)


def _write_ledger(rows, destination, delivered_at):
    """Insert a DeliveredEvent per delivered row, skipping any already there."""
    DeliveredEvent.objects.bulk_create(
        [
            DeliveredEvent(
                **{name: getattr(row, name) for name in _LEDGER_ROW_FIELDS},
                end_reasons=row.end_reasons(),
                destination=destination,
                delivered_at=delivered_at,
            )
            for row in rows
        ],
        ignore_conflicts=True,
    )


def _move_to_ledger(row_ids, destination, delivered_at):
    """Delete the rows that are still sealed and insert their ledger entries in one statement (PostgreSQL).

    Returns the ids of the rows moved. A sealed row's values are final, so the
    ledger copies them from the deleted row. This replaces a locking select,
    a delete and a bulk_create whose 6,000-placeholder statement Django and
    psycopg prepare value by value, which took most of a drain's time per page
    (BENCHMARKS.md, drain).
    """
    columns = ", ".join(_LEDGER_ROW_FIELDS)
    reasons = ", ".join(f"'{reason}', ended_{reason}" for reason in END_REASONS)
    with connection.cursor() as cursor:
        cursor.execute(
            f"WITH moved AS (DELETE FROM {UsageBucket._meta.db_table} WHERE id = ANY(%s::bigint[]) AND state = %s "
            f"RETURNING id, {columns}, jsonb_build_object({reasons}) AS end_reasons), "
            f"ledger AS (INSERT INTO {DeliveredEvent._meta.db_table} ({columns}, end_reasons, destination, delivered_at) "
            f"SELECT {columns}, end_reasons, %s, %s FROM moved ON CONFLICT DO NOTHING) "
            "SELECT id FROM moved",
            [list(row_ids), str(UsageBucket.State.SEALED), destination, delivered_at],
        )
        return {row[0] for row in cursor.fetchall()}


def _keep_for_retry(rows, error, report, now):
    """Record a failed attempt on each row and set its next attempt with exponential backoff."""
    retry_after = getattr(error, "retry_after", None)
    last_error = str(error)[:_MAX_ERROR_LENGTH]
    updated = []
    for row in rows:
        attempts = row.attempts + 1
        delay = min(settings.DRAIN_MAX_BACKOFF_SECONDS, 30 * 2 ** (attempts - 1))
        if retry_after:
            delay = max(delay, min(float(retry_after), settings.DRAIN_MAX_BACKOFF_SECONDS))
        updated.append(
            UsageBucket(
                id=row.id, attempts=attempts, next_attempt_at=now + timedelta(seconds=delay), last_error=last_error
            )
        )
    UsageBucket.objects.bulk_update(updated, ["attempts", "next_attempt_at", "last_error"])
    report.kept_for_retry += len(rows)
    report.errors.append(str(error))
    logger.warning(
        "delivery of %s events to %s failed: %s; rows kept, next attempt in about %s s",
        len(rows),
        getattr(report, "destination", "?"),
        error,
        int((updated[0].next_attempt_at - now).total_seconds()),
    )


def _park(row, error, report):
    UsageBucket.objects.filter(id=row.id, state=UsageBucket.State.SEALED).update(
        state=UsageBucket.State.REJECTED, attempts=row.attempts + 1, last_error=str(error)[:_MAX_ERROR_LENGTH]
    )
    report.parked += 1
    logger.error(
        "parked event %s (org %s, bucket %s) as rejected: %s; fix it and use 'retry parked' in the admin",
        row.event_uuid,
        row.org_id,
        row.bucket_start,
        error,
    )


def drain(now=None, org_id=None, transport=None, keep_lock=None, progress=None, batch_size=None):
    """Seal closed buckets, ship what is due and forget expired message ids; return a DrainReport."""
    started = time.monotonic()
    now = now or _now()
    transport = transport or configured_transport()
    report = DrainReport(destination=transport.destination)
    logger.info("drain started: org=%s destination=%s", org_id or "all", report.destination)

    sealer = SealAhead(now, org_id)
    ship_sealed(report, transport, now, org_id, batch_size, keep_lock, progress, sealer=sealer)
    report.sealed = sealer.sealed
    delete_expired_message_keys(now - settings.METERING_DEDUP_RETENTION)

    report.duration_ms = int((time.monotonic() - started) * 1000)
    logger.info(
        "drain finished: sealed=%s delivered=%s compute_seconds=%s requests=%s kept_for_retry=%s parked=%s "
        "destination=%s ms=%s",
        report.sealed,
        report.delivered_events,
        _seconds_text(sum(totals.compute_milli for totals in report.delivered.values())),
        report.requests,
        report.kept_for_retry,
        report.parked,
        report.destination,
        report.duration_ms,
    )
    return report


def drain_with_lock(now=None, org_id=None, transport=None, progress=None, batch_size=None):
    """Run ``drain`` under the singleton lock; raises DrainLockHeld when another drain holds it."""
    lock = drain_lock()
    if not lock.acquire():
        raise DrainLockHeld(lock.holder())
    try:
        return drain(now, org_id, transport, lock.extend, progress, batch_size)
    finally:
        lock.release()


def ship_now(row_ids, transport=None):
    """Seal and ship the given rows at once, under the drain lock; return a DrainReport."""
    lock = drain_lock()
    if not lock.acquire():
        raise DrainLockHeld(lock.holder())
    try:
        transport = transport or configured_transport()
        report = DrainReport(destination=transport.destination)
        report.sealed = seal_closed_buckets(row_ids=row_ids)
        ship_sealed(report, transport, keep_lock=lock.extend, row_ids=row_ids)
        return report
    finally:
        lock.release()


def retry_parked(row_ids=None):
    """Put parked (rejected) rows back in the queue to ship; return how many."""
    parked = UsageBucket.objects.filter(state=UsageBucket.State.REJECTED)
    if row_ids is not None:
        parked = parked.filter(id__in=row_ids)
    return parked.update(state=UsageBucket.State.SEALED, attempts=0, next_attempt_at=None)


def pending_by_org(now=None, org_id=None):
    """Return what a drain would seal and ship now, per org: {org: OrgTotals}. Writes nothing."""
    now = now or _now()
    pending = collections.defaultdict(OrgTotals)
    for queryset in (closed_open_rows(now, org_id), _due_rows(now, org_id)):
        for org, events, compute_milli, connections in queryset.values_list("org_id").annotate(
            events=Count("id"), compute=Sum("compute_milli"), conns=Sum("connections")
        ).values_list("org_id", "events", "compute", "conns"):
            totals = pending[org]
            totals.events += events
            totals.compute_milli += compute_milli
            totals.connections += connections
    return pending


def _seconds_text(milli):
    return f"{milli // 1000}.{milli % 1000:03d}"


def bucket_start_datetime(bucket_start):
    return datetime.fromtimestamp(bucket_start, timezone.utc)
