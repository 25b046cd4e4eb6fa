"""The in-process metering client that control-plane processes embed.

The teardown path, ``record_connection_end``, must never fail or slow a
connection. It only appends a tuple to a ``collections.deque`` (atomic under
the GIL, no lock, no I/O) and never raises. A background flusher thread does
everything else: it validates each connection, computes its usage, folds it
into one aggregate row per (org, bucket), and publishes the rows as Celery
messages, each with a batch id that makes its application idempotent.

Failure handling:
- Invalid input is logged with the bad value and counted in ``stats()``.
- A broker that is down or frozen makes a publish fail within the publish
  timeout. The frozen batch is kept and retried later under the same batch id,
  so a publish whose outcome was unknown cannot count twice.
- With ``confirmations`` (see metering.confirmations) a published batch is
  kept until a worker confirms it, and sent again under the same batch id when
  no confirmation came within ``confirm_seconds``. This covers a batch the
  broker lost after taking it.
- Memory is bounded: past ``max_pending_keys`` unpublished rows (or
  ``max_pending_connections`` unfolded connections) new connections are
  dropped, counted and logged. Published batches waiting for a confirmation
  are held apart, up to ``max_pending_keys`` rows as well. Past that the
  oldest are no longer waited for: they are in the broker, and stopped
  workers must not make the client drop new connection ends.
- At interpreter exit the client flushes for at most ``exit_flush_seconds``,
  retrying publishes that fail and waiting for confirmations.
  A process killed with SIGKILL loses what it had not published yet.
- After ``os.fork()`` the child starts with an empty client of its own; the
  parent keeps and publishes what it had recorded.
"""

import atexit
import collections
import contextlib
import logging
import os
import struct
import threading
import time
import uuid
from fractions import Fraction

from metering import units
from metering.confirmations import confirmations_from_settings
from metering.connections import new_row, resolve_times, validate_connection_id, validate_org_id

logger = logging.getLogger(__name__)

_REASON_INDEX = {reason: index for index, reason in enumerate(units.END_REASONS)}
# Aggregate row layout: compute, cpu, memory (thousandths), connections, then one count per end reason.
_COUNTERS = 4
_LOG_EVERY_SECONDS = 60.0
# A frozen aggregate row: bucket start, then the counters, as signed 64-bit integers.
_PACKED_ROW = struct.Struct(f"<q{_COUNTERS + len(units.END_REASONS)}q")
# Pauses between publish attempts of the exit flush, doubling from the first to the maximum.
_EXIT_RETRY_FIRST_DELAY_SECONDS = 0.1
_EXIT_RETRY_MAX_DELAY_SECONDS = 1.0
# A batch is sent again at most this many times without a confirmation, each
# time after twice the previous wait, up to the maximum wait.
_MAX_RESENDS = 5
_MAX_CONFIRM_WAIT_SECONDS = 600.0
# How often the exit flush reads confirmations.
_EXIT_CONFIRM_POLL_SECONDS = 0.1


class _RateLimitedLog:
    """Log the first occurrence of a kind of problem, then at most once a minute with a count."""

    def __init__(self):
        self._last_logged = {}
        self._suppressed = collections.Counter()

    def warning(self, kind, message, *args):
        now = time.monotonic()
        last = self._last_logged.get(kind)
        if last is not None and now - last < _LOG_EVERY_SECONDS:
            self._suppressed[kind] += 1
            return
        suppressed = self._suppressed.pop(kind, 0)
        self._last_logged[kind] = now
        if suppressed:
            message += " (%s similar messages suppressed in the last minute)"
            args = (*args, suppressed)
        logger.warning(message, *args)


def publish_with_celery(batch_id, rows, timeout_seconds, *, app=None, queue=None):
    """Send one batch to the worker as a ``metering.apply_batch`` message.

    ``app`` defaults to the project's Celery app and ``queue`` to
    CELERY_TASK_DEFAULT_QUEUE. Raises whatever kombu raises when the broker
    cannot take the message. The app's broker transport options should bound
    each socket operation by the same timeout, as the project's settings do.
    """
    from django.conf import settings

    if app is None:
        from settings.celery import app
    if queue is None:
        queue = settings.CELERY_TASK_DEFAULT_QUEUE

    app.send_task(
        "metering.apply_batch",
        kwargs={"batch_id": batch_id, "rows": rows},
        task_id=batch_id,
        queue=queue,
        retry=True,
        retry_policy={
            "max_retries": 1,
            "interval_start": 0,
            "interval_step": timeout_seconds,
            "interval_max": timeout_seconds,
        },
    )


class MeteringClient:
    def __init__(
        self,
        *,
        bucket_seconds,
        memory_per_core_gib,
        max_connection_seconds,
        flush_seconds=2.0,
        max_pending_keys=100_000,
        max_pending_connections=1_000_000,
        rows_per_message=500,
        publish_timeout_seconds=2.0,
        exit_flush_seconds=5.0,
        publish=publish_with_celery,
        confirmations=None,
        confirm_seconds=60.0,
        register_exit_flush=True,
    ):
        self.bucket_seconds = int(bucket_seconds)
        self.memory_per_core_gib = Fraction(memory_per_core_gib)
        self.max_connection_seconds = int(max_connection_seconds)
        self.flush_seconds = float(flush_seconds)
        self.max_pending_keys = int(max_pending_keys)
        self.max_pending_connections = int(max_pending_connections)
        self.rows_per_message = int(rows_per_message)
        self.publish_timeout_seconds = float(publish_timeout_seconds)
        self.exit_flush_seconds = float(exit_flush_seconds)
        self._publish = publish
        self._confirmations = confirmations
        self.confirm_seconds = float(confirm_seconds)
        self._rates = {}
        self._log = _RateLimitedLog()
        self._reset_state()
        if register_exit_flush:
            atexit.register(self.close)
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._reset_state)

    def _reset_state(self):
        self._incoming = collections.deque()
        self._aggregate = {}
        self._keyed_rows = []
        # Frozen batches, each (batch id, rows, times sent before), in publishing order.
        self._unsent = collections.deque()
        self._unsent_rows = 0
        # Published batches waiting for a confirmation:
        # batch id -> (rows, when published, when to send again, times sent before).
        self._unconfirmed = {}
        self._unconfirmed_rows = 0
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        self._thread_lock = threading.Lock()
        self._closed = False
        self._counts = collections.Counter()
        self._dropped_logged = 0

    # The teardown path.

    def record(
        self,
        org_id,
        cores,
        memory,
        started_at=None,
        ended_at=None,
        duration_seconds=None,
        end_reason="client_disconnect",
        connection_id=None,
    ):
        """Queue one connection end. Never raises, never blocks, does no I/O."""
        try:
            if len(self._incoming) >= self.max_pending_connections:
                self._counts["dropped"] += 1
                return
            self._incoming.append(
                (org_id, cores, memory, started_at, ended_at or time.time(), duration_seconds, end_reason, connection_id)
            )
            if self._thread is None:
                self._start_flusher()
        except Exception:  # noqa: BLE001 - the teardown path must never raise
            self._counts["internal_errors"] += 1

    def _start_flusher(self):
        with self._thread_lock:
            if self._thread is not None or self._closed:
                return
            self._thread = threading.Thread(target=self._run_flusher, name="metering-flusher", daemon=True)
            self._thread.start()

    # The flusher.

    def _run_flusher(self):
        # Fold every interval, even while publishing backs off after a broker
        # failure: folding is what keeps the unfolded queue from overflowing.
        publish_delay = self.flush_seconds
        next_publish = time.monotonic() + self.flush_seconds
        while not self._stop.wait(self.flush_seconds):
            try:
                if time.monotonic() < next_publish:
                    self.fold()
                    continue
                delivered_all = self.flush()
            except Exception:  # noqa: BLE001 - keep the flusher alive whatever happens
                logger.exception("metering flusher failed; it will retry in %.1f s", publish_delay)
                delivered_all = False
            if delivered_all:
                publish_delay = self.flush_seconds
            else:
                publish_delay = min(max(publish_delay * 2, self.flush_seconds), 30.0)
            next_publish = time.monotonic() + publish_delay

    def fold(self):
        """Fold queued connection ends into the aggregate without publishing."""
        with self._flush_lock:
            self._fold_incoming()

    def flush(self, deadline=None):
        """Fold queued connections and publish every pending batch.

        Returns True when nothing is left to publish. Stops at the first
        failed publish (the broker is likely down) and keeps the rest.
        Batches waiting for a confirmation do not count as left to publish
        until their wait is over.
        """
        with self._flush_lock:
            self._fold_incoming()
            self._freeze_aggregate()
            self._collect_confirmations()
            while self._unsent:
                if deadline is not None and time.monotonic() >= deadline:
                    return False
                batch_id, frozen_rows, sent_before = self._unsent[0]
                rows = self._message_rows(frozen_rows)
                started = time.monotonic()
                try:
                    self._publish(batch_id, rows, self.publish_timeout_seconds)
                except Exception as error:  # noqa: BLE001 - any broker failure is retried later
                    self._counts["publish_failures"] += 1
                    self._log.warning(
                        "publish_failed",
                        "metering could not publish batch %s (%s rows) after %.0f ms: %s; "
                        "keeping %s pending rows and retrying later",
                        batch_id,
                        len(rows),
                        (time.monotonic() - started) * 1000,
                        error,
                        self._unsent_rows + len(self._aggregate),
                    )
                    return False
                self._unsent.popleft()
                self._unsent_rows -= len(rows)
                self._counts["published_messages"] += 1
                self._counts["published_rows"] += len(rows)
                if self._confirmations is not None:
                    now = time.monotonic()
                    wait = min(self.confirm_seconds * 2**sent_before, _MAX_CONFIRM_WAIT_SECONDS)
                    self._unconfirmed[batch_id] = (frozen_rows, now, now + wait, sent_before)
                    self._unconfirmed_rows += len(frozen_rows)
                    self._limit_unconfirmed()
            return True

    def _limit_unconfirmed(self):
        """Stop waiting for the oldest confirmations while more than ``max_pending_keys`` rows wait for one."""
        released = 0
        while self._unconfirmed_rows > self.max_pending_keys and len(self._unconfirmed) > 1:
            batch_id = next(iter(self._unconfirmed))
            frozen_rows = self._unconfirmed.pop(batch_id)[0]
            self._unconfirmed_rows -= len(frozen_rows)
            released += 1
        if released:
            self._counts["unconfirmed_released"] += released
            self._log.warning(
                "unconfirmed_released",
                "metering stopped waiting for a worker to confirm %s published batches: more than %s rows "
                "(METERING_MAX_PENDING_KEYS) were waiting; they stay in the broker. Are the workers running?",
                released,
                self.max_pending_keys,
            )

    def _collect_confirmations(self):
        """Forget the batches workers confirmed; queue again those whose wait is over."""
        if not self._unconfirmed:
            return
        try:
            confirmed = self._confirmations.take_confirmed(self._unconfirmed)
        except Exception as error:  # noqa: BLE001 - Redis is down or frozen; ask again next time
            self._counts["confirmation_failures"] += 1
            self._log.warning(
                "confirmations_failed",
                "metering could not read which of %s published batches workers confirmed: %s; asking again later",
                len(self._unconfirmed),
                error,
            )
            return
        for batch_id in confirmed:
            entry = self._unconfirmed.pop(batch_id, None)
            if entry is not None:
                self._unconfirmed_rows -= len(entry[0])
                self._counts["confirmed_messages"] += 1
        now = time.monotonic()
        overdue = [batch_id for batch_id, entry in self._unconfirmed.items() if entry[2] <= now]
        for batch_id in overdue:
            frozen_rows, published_at, _, sent_before = self._unconfirmed.pop(batch_id)
            self._unconfirmed_rows -= len(frozen_rows)
            if sent_before >= _MAX_RESENDS:
                self._counts["unconfirmed_given_up"] += 1
                logger.error(
                    "metering gave up on batch %s (%s rows): no worker confirmed it after %s sends; "
                    "check that the workers run this version and reach the broker's Redis",
                    batch_id,
                    len(frozen_rows),
                    sent_before + 1,
                )
                continue
            self._unsent.appendleft((batch_id, frozen_rows, sent_before + 1))
            self._unsent_rows += len(frozen_rows)
            self._counts["resent_messages"] += 1
            self._log.warning(
                "resend",
                "metering sends batch %s again: no worker confirmed it within %.1f s",
                batch_id,
                now - published_at,
            )

    def _fold_incoming(self):
        # The teardown path only counts what it drops at the queue's cap; the log line is written here.
        dropped = self._counts["dropped"]
        if dropped > self._dropped_logged:
            self._log.warning(
                "dropped_unfolded",
                "metering dropped %s connection ends: %s were queued unfolded (the maximum, "
                "METERING_MAX_PENDING_CONNECTIONS)",
                dropped - self._dropped_logged,
                self.max_pending_connections,
            )
            self._dropped_logged = dropped
        incoming = self._incoming
        while True:
            try:
                item = incoming.popleft()
            except IndexError:
                return
            try:
                self._fold_one(*item)
            except units.InvalidUsage as error:
                self._counts["invalid"] += 1
                # Rate-limit per kind of problem ("invalid cores", "invalid ended_at"), so a
                # flood of one mistake does not hide a different one.
                kind = " ".join(str(error).split()[:2])
                self._log.warning(kind, "metering ignored a connection end for org %r: %s", item[0], error)

    def _fold_one(self, org_id, cores, memory, started_at, ended_at, duration_seconds, end_reason, connection_id):
        org_id = validate_org_id(org_id)
        rates = self._worker_rates(cores, memory)
        ended_epoch, duration = resolve_times(started_at, ended_at, duration_seconds, self.max_connection_seconds)
        usage = units.usage_for_seconds(rates, units.billed_seconds(duration))
        reason = self._end_reason(end_reason, org_id)
        bucket_start = units.bucket_start_for(ended_epoch, self.bucket_seconds)

        if connection_id is not None:
            connection_id = validate_connection_id(connection_id)
            if self._pending_keys() >= self.max_pending_keys:
                self._drop(org_id)
                return
            row = new_row(org_id, bucket_start, self.bucket_seconds, usage, reason)
            row["connection_id"] = connection_id
            self._keyed_rows.append(row)
            self._counts["recorded"] += 1
            return

        key = (org_id, bucket_start)
        counters = self._aggregate.get(key)
        if counters is None:
            if self._pending_keys() >= self.max_pending_keys:
                self._drop(org_id)
                return
            counters = self._aggregate[key] = [0] * (_COUNTERS + len(units.END_REASONS))
        counters[0] += usage.compute_milli
        counters[1] += usage.cpu_milli
        counters[2] += usage.memory_milli
        counters[3] += 1
        counters[_COUNTERS + _REASON_INDEX[reason]] += 1
        self._counts["recorded"] += 1

    def _pending_keys(self):
        return len(self._aggregate) + len(self._keyed_rows) + self._unsent_rows

    def _drop(self, org_id):
        self._counts["dropped"] += 1
        self._dropped_logged += 1
        self._log.warning(
            "dropped",
            "metering dropped a connection end for org %r: %s rows are pending (the maximum, "
            "METERING_MAX_PENDING_KEYS) while the broker does not take them",
            org_id,
            self._pending_keys(),
        )

    def _worker_rates(self, cores, memory):
        cache_key = (cores, memory)
        try:
            return self._rates[cache_key]
        except (KeyError, TypeError):
            pass
        rates = units.usage_rates(units.parse_worker_size(cores, memory), self.memory_per_core_gib)
        if len(self._rates) < 10_000:
            try:
                self._rates[cache_key] = rates
            except TypeError:
                pass
        return rates

    def _end_reason(self, end_reason, org_id):
        if units.normalise_end_reason(end_reason) is not None:
            return end_reason
        self._counts["unknown_end_reasons"] += 1
        self._log.warning(
            "end_reason",
            "metering recorded unknown end reason %r for org %r as 'other'; accepted reasons are %s",
            end_reason,
            org_id,
            ", ".join(units.END_REASONS),
        )
        return "other"

    def _freeze_aggregate(self):
        """Move aggregate rows into fixed batches, each with its own batch id.

        Aggregate rows wait in packed form (``_pack_row``) and become message
        rows only when their batch is published. During a broker outage every
        pending key waits here, and the packed form takes about 250 bytes per
        key where a message row dict takes about 650 (BENCHMARKS.md, memory).
        """
        rows = list(self._keyed_rows)
        self._keyed_rows = []
        for (org_id, bucket_start), counters in self._aggregate.items():
            rows.append(self._pack_row(org_id, bucket_start, counters))
        self._aggregate = {}
        for start in range(0, len(rows), self.rows_per_message):
            chunk = rows[start : start + self.rows_per_message]
            self._unsent.append((str(uuid.uuid4()), chunk, 0))
            self._unsent_rows += len(chunk)

    def _pack_row(self, org_id, bucket_start, counters):
        try:
            return (org_id, _PACKED_ROW.pack(bucket_start, *counters))
        except struct.error:
            # A value beyond 64 bits keeps the message row itself.
            return _aggregate_row(org_id, bucket_start, self.bucket_seconds, counters)

    def _message_rows(self, frozen_rows):
        """Return a frozen batch as the rows of its message: the same rows every time it is published."""
        rows = []
        for row in frozen_rows:
            if isinstance(row, dict):
                rows.append(row)
                continue
            org_id, packed = row
            bucket_start, *counters = _PACKED_ROW.unpack(packed)
            rows.append(_aggregate_row(org_id, bucket_start, self.bucket_seconds, counters))
        return rows

    # Lifecycle.

    def stats(self):
        """Return counters: recorded, invalid, dropped, published, confirmed and resent messages, pending rows.

        ``pending_rows`` are rows not published yet; ``unconfirmed_rows`` were
        published and wait for a worker's confirmation.
        """
        counts = dict(self._counts)
        counts["pending_rows"] = self._pending_keys()
        counts["unconfirmed_rows"] = self._unconfirmed_rows
        counts["queued_connections"] = len(self._incoming)
        return counts

    def close(self, timeout=None):
        """Stop the flusher and publish what is pending, for at most ``timeout`` seconds. Never raises.

        Failed publishes are retried until the deadline, so a broker that is
        restarting while the process stops still gets the pending rows. With
        confirmations it then waits for them, and sends once more each batch
        still unconfirmed halfway to the deadline. The final flush runs in a
        daemon thread that is abandoned at the deadline: one publish to a
        frozen broker can take several socket timeouts, and interpreter exit
        must not wait for it.
        """
        try:
            timeout = self.exit_flush_seconds if timeout is None else timeout
            deadline = time.monotonic() + timeout
            self._closed = True
            self._stop.set()
            thread = self._thread
            if thread is not None and thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
            if not (self._incoming or self._aggregate or self._keyed_rows or self._unsent or self._unconfirmed):
                return
            outcome = []
            final = threading.Thread(
                target=lambda: outcome.append(self._flush_until(deadline)), name="metering-exit-flush", daemon=True
            )
            final.start()
            final.join(max(0.0, deadline - time.monotonic()))
            if outcome and outcome[0]:
                return
            unpublished = self._pending_keys() + len(self._incoming)
            if unpublished:
                logger.error(
                    "metering exit flush could not publish %s pending rows within %.1f s; they are lost",
                    unpublished,
                    timeout,
                )
            if self._unconfirmed:
                logger.warning(
                    "metering exit flush: no worker confirmed %s published batches (%s rows) within %.1f s; "
                    "they stay queued in the broker unless it lost them",
                    len(self._unconfirmed),
                    self._unconfirmed_rows,
                    timeout,
                )
        except Exception:  # noqa: BLE001 - exit handlers must not raise
            logger.exception("metering exit flush failed")

    def stop(self):
        """Stop the flusher without publishing what is pending, and return how many rows that is.

        For a caller that gave up, such as an import that failed and will be
        run again. A flush already running may still finish its publish, but
        nothing is published after it.
        """
        self._closed = True
        self._stop.set()
        return self._pending_keys() + len(self._incoming)

    def _flush_until(self, deadline):
        """Flush, retrying failed publishes and waiting for confirmations, until all is confirmed or the deadline."""
        send_again_at = time.monotonic() + (deadline - time.monotonic()) / 2
        hurried = set()
        delay = _EXIT_RETRY_FIRST_DELAY_SECONDS
        while True:
            published_all = self.flush(deadline=deadline)
            self._hurry_confirmations(send_again_at, hurried)
            if published_all and not self._unconfirmed:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if published_all:
                time.sleep(min(_EXIT_CONFIRM_POLL_SECONDS, remaining))
                continue
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, _EXIT_RETRY_MAX_DELAY_SECONDS)

    def _hurry_confirmations(self, send_again_at, hurried):
        """Bring forward to ``send_again_at`` the resend of each batch not in ``hurried``, once per batch."""
        with self._flush_lock:
            for batch_id, (frozen_rows, published_at, due, sent_before) in self._unconfirmed.items():
                if batch_id not in hurried:
                    hurried.add(batch_id)
                    self._unconfirmed[batch_id] = (frozen_rows, published_at, min(due, send_again_at), sent_before)


def _aggregate_row(org_id, bucket_start, bucket_seconds, counters):
    reasons = {
        reason: counters[_COUNTERS + index]
        for index, reason in enumerate(units.END_REASONS)
        if counters[_COUNTERS + index]
    }
    return {
        "org_id": org_id,
        "bucket_start": bucket_start,
        "bucket_seconds": bucket_seconds,
        "compute_milli": counters[0],
        "cpu_milli": counters[1],
        "memory_milli": counters[2],
        "connections": counters[3],
        "end_reasons": reasons,
    }


_default_client = None
_default_client_lock = threading.Lock()


def get_client():
    """Return the process-wide client, configured from Django settings."""
    global _default_client
    if _default_client is None:
        with _default_client_lock:
            if _default_client is None:
                from django.conf import settings

                _default_client = MeteringClient(
                    bucket_seconds=settings.METERING_BUCKET_SECONDS,
                    memory_per_core_gib=settings.METERING_MEMORY_PER_CORE_GIB,
                    max_connection_seconds=settings.METERING_MAX_CONNECTION_SECONDS,
                    flush_seconds=settings.METERING_FLUSH_SECONDS,
                    max_pending_keys=settings.METERING_MAX_PENDING_KEYS,
                    max_pending_connections=settings.METERING_MAX_PENDING_CONNECTIONS,
                    rows_per_message=settings.METERING_ROWS_PER_MESSAGE,
                    publish_timeout_seconds=settings.METERING_PUBLISH_TIMEOUT_SECONDS,
                    exit_flush_seconds=settings.METERING_EXIT_FLUSH_SECONDS,
                    confirmations=confirmations_from_settings(),
                    confirm_seconds=settings.METERING_CONFIRM_SECONDS,
                )
    return _default_client


def record_connection_end(
    org_id,
    cores,
    memory,
    started_at=None,
    ended_at=None,
    duration_seconds=None,
    end_reason="client_disconnect",
    connection_id=None,
):
    """Record that a connection ended. Never raises and does no I/O.

    ``cores`` and ``memory`` are the worker's provisioned size as Kubernetes
    quantities (``"500m"``, ``"16Gi"``). Give ``duration_seconds``, or
    ``started_at`` (aware datetime). ``ended_at`` defaults to now. With a
    ``connection_id`` the connection is applied at most once however often it
    is recorded; without one it is aggregated with others.
    """
    client = _default_client
    if client is None:
        try:
            client = get_client()
        except Exception:  # noqa: BLE001 - the teardown path must never raise
            logger.exception("metering client could not start; connection end for org %r not recorded", org_id)
            return
    client.record(org_id, cores, memory, started_at, ended_at, duration_seconds, end_reason, connection_id)


class MeteredConnection:
    """The handle ``metered_connection`` yields; set ``end_reason`` before the block ends."""

    def __init__(self):
        self.end_reason = None


@contextlib.contextmanager
def metered_connection(org_id, cores, memory, connection_id=None):
    """Time a connection with a monotonic clock and record its end when the block exits.

    The end reason is the handle's ``end_reason`` if the block set it, else
    ``client_disconnect``, or ``other`` when the block raised. Exceptions from
    the block propagate unchanged.
    """
    handle = MeteredConnection()
    started = time.monotonic()
    try:
        yield handle
    except BaseException:
        if handle.end_reason is None:
            handle.end_reason = "other"
        raise
    finally:
        duration = time.monotonic() - started
        record_connection_end(
            org_id,
            cores,
            memory,
            duration_seconds=duration,
            end_reason=handle.end_reason or "client_disconnect",
            connection_id=connection_id,
        )
