"""End to end: connection ends from control-plane processes, through Redis and workers, to a capture server.

``--producers`` processes (multiprocessing, spawn), each with its own
MeteringClient publishing to Redis with the project's settings, record
``--connections`` connection ends in total over ``--orgs`` orgs. Real
``celery worker -P solo`` processes apply the batches to PostgreSQL. Once the
buffer contains every connection, ``billing_drain.services.drain`` ships it to
the capture server (``python -m bench.capture``) on 127.0.0.1. The compute
seconds billed per org are then compared with expected sums that each
producer computes on its own from the worker sizes and durations it drew,
without metering.units.

Figures:
- recorded/s, as fast as they can (the default): connection ends divided by
  the time from the producers' start until the last producer's client has
  folded and published everything (nothing pending in ``stats()``). It is
  the rate the clients sustain, not the rate of the ``record`` calls alone,
  which is printed too. The time until the workers confirmed every batch
  (``close()`` returned) is printed too.
- recorded/s with ``--rate`` (paced): the rate the ``record`` calls kept. It
  meets the target only if the clients kept up, that is if they had published
  everything at most two flush intervals after the last call.
- time until all delivered: from the producers' start until the drain returned.
- worker RSS: sampled from /proc every 0.25 s while the benchmark runs.

Run: python -m bench.end_to_end [--connections 200000] [--producers 2] [--workers 1]
"""

import collections
import functools
import multiprocessing
import random
import sys
import threading
import time
import uuid

from bench import common

TARGET_RECORDED_PER_SECOND = 100_000
# (cores, memory, compute thousandths per second at 2 GiB per core): max(cores, GiB / 2) * 1000.
SIZES = (("8", "16Gi", 8000), ("2", "4Gi", 2000), ("500m", "3Gi", 1500), ("8", "64Gi", 32000))
PACING_GROUP = 200


def build_work(index, count, orgs, seed):
    """Return this producer's (org, cores, memory, duration) items and its expected totals per org."""
    rng = random.Random(seed * 1000 + index)
    org_ids = [f"org-{number:06d}" for number in range(orgs)]
    work = []
    expected = collections.defaultdict(lambda: [0, 0])
    for number in range(count):
        cores, memory, milli_per_second = SIZES[number % len(SIZES)]
        duration_ms = rng.randrange(0, 600_000)
        org = rng.choice(org_ids)
        work.append((org, cores, memory, duration_ms / 1000))
        billed_seconds = max(1, (duration_ms + 999) // 1000)
        totals = expected[org]
        totals[0] += milli_per_second * billed_seconds
        totals[1] += 1
    return work, {org: tuple(totals) for org, totals in expected.items()}


def producer(index, count, orgs, seed, queue, rate, flush_seconds, ready, start, results):
    """Record this producer's share through its own MeteringClient and report what happened."""
    common.setup_child_process()
    from metering.client import MeteringClient, publish_with_celery
    from metering.confirmations import confirmations_from_settings

    work, expected = build_work(index, count, orgs, seed)
    client = MeteringClient(
        bucket_seconds=60,
        memory_per_core_gib=2,
        max_connection_seconds=31 * 86400,
        flush_seconds=flush_seconds,
        publish=functools.partial(publish_with_celery, queue=queue),
        confirmations=confirmations_from_settings(),
        register_exit_flush=False,
    )
    ready.set()
    start.wait()
    seconds_per_call = 1.0 / rate if rate else 0.0
    started = time.monotonic()
    record = client.record
    max_queued = 0
    for number, (org, cores, memory, duration) in enumerate(work):
        if number % PACING_GROUP == 0:
            max_queued = max(max_queued, client.stats()["queued_connections"])
            if seconds_per_call:
                ahead = started + number * seconds_per_call - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
        record(org, cores, memory, None, None, duration)
    recorded = time.monotonic()
    deadline = recorded + 300
    while client.stats()["pending_rows"] or client.stats()["queued_connections"]:
        if time.monotonic() >= deadline:
            break
        client.flush(deadline=deadline)
    published = time.monotonic()
    # Then wait, as the exit flush does, until the workers confirmed every batch.
    client.close(timeout=300)
    confirmed = time.monotonic()
    results.put(
        {
            "index": index,
            "started": started,
            "recorded": recorded,
            "published": published,
            "confirmed": confirmed,
            "stats": client.stats(),
            "max_queued": max_queued,
            "expected": expected,
        }
    )


class RssSampler:
    """Sample the RSS of some processes every ``interval`` seconds in a thread."""

    def __init__(self, pids, interval=0.25):
        self.pids = list(pids)
        self.interval = interval
        self.samples = {pid: [] for pid in self.pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            for pid in self.pids:
                rss = common.rss_bytes(pid)
                if rss is not None:
                    self.samples[pid].append(rss)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join(5)


def wait_for_buffer(total, timeout_seconds, workers):
    from django.db.models import Sum

    from metering.models import UsageBucket

    deadline = time.monotonic() + timeout_seconds
    while True:
        applied = UsageBucket.objects.aggregate(total=Sum("connections"))["total"] or 0
        if applied >= total:
            return applied
        for worker in workers:
            if worker.process.poll() is not None:
                raise RuntimeError(f"a worker exited early:\n{worker.log_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_seconds} s: {applied:,} of {total:,} connections applied")
        time.sleep(0.05)


def drain_all(url):
    from datetime import timedelta

    from django.conf import settings
    from django.utils import timezone

    from billing_drain import services
    from billing_drain.transport import PostHogTransport

    # A drain "now" past the end of every bucket so that every row is sealed and shipped at once.
    now = timezone.now() + timedelta(seconds=settings.METERING_BUCKET_SECONDS + settings.METERING_GRACE_SECONDS + 1)
    return services.drain(now=now, transport=PostHogTransport(common.CAPTURE_API_KEY, url, 30))


def check_billing(events, expected):
    """Compare the captured events with the expected totals; return a list of problems (empty when exact)."""
    billed = collections.defaultdict(lambda: [0, 0])
    uuids = collections.Counter()
    for event in events:
        totals = billed[event["distinct_id"]]
        totals[0] += event["properties"]["compute_milli"]
        totals[1] += event["properties"]["connections"]
        uuids[event["uuid"]] += 1
    billed = {org: tuple(totals) for org, totals in billed.items()}
    problems = []
    if billed != expected:
        wrong = [org for org in set(billed) | set(expected) if billed.get(org) != expected.get(org)]
        problems.append(
            f"{len(wrong)} orgs billed differently from expected, e.g. {wrong[0]}: "
            f"billed {billed.get(wrong[0])}, expected {expected.get(wrong[0])} (compute milli, connections)"
        )
    repeated = sum(1 for count in uuids.values() if count > 1)
    if repeated:
        problems.append(f"{repeated} event uuids were delivered more than once")
    return problems


def run(args):
    from billing_drain.models import DeliveredEvent
    from metering.models import UsageBucket

    rate_text = f"{args.rate:,.0f}/s offered" if args.rate else "as fast as they can"
    print(
        f"\n== end to end: {args.connections:,} connection ends over {args.orgs:,} orgs from {args.producers} "
        f"producer processes ({rate_text}), {args.workers} worker(s), flush every {args.flush_seconds} s =="
    )
    common.clear_tables()
    queue = f"bench-e2e-{uuid.uuid4().hex[:8]}"
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    start = context.Event()
    shares = [args.connections // args.producers] * args.producers
    shares[0] += args.connections - sum(shares)
    per_producer_rate = args.rate / args.producers if args.rate else 0
    capture_dir = common.data_dir() / f"capture-{queue}"
    workers = []
    processes = []
    try:
        with common.CaptureProcess(capture_dir) as capture:
            workers = common.start_workers(args.workers, queue, "e2e")
            with RssSampler([worker.process.pid for worker in workers]) as sampler:
                readies = []
                for index, share in enumerate(shares):
                    ready = context.Event()
                    process = context.Process(
                        target=producer,
                        args=(index, share, args.orgs, args.seed, queue, per_producer_rate, args.flush_seconds,
                              ready, start, results),
                    )
                    process.start()
                    processes.append(process)
                    readies.append(ready)
                for ready in readies:
                    if not ready.wait(300):
                        raise RuntimeError("a producer did not get ready within 300 s")
                start.set()
                reports = [results.get(timeout=args.timeout) for _ in processes]
                started = min(report["started"] for report in reports)
                recorded = max(report["recorded"] for report in reports)
                published = max(report["published"] for report in reports)
                applied = wait_for_buffer(args.connections, args.timeout, workers)
                applied_at = time.monotonic()
                rows_in_buffer = UsageBucket.objects.count()
                report = drain_all(capture.url)
                delivered_at = time.monotonic()
            events = capture.events()
    finally:
        for process in processes:
            process.join(10)
            if process.is_alive():
                process.terminate()
        common.stop_workers(workers)
        common.delete_queue_keys(args.redis_url, queue)

    expected = collections.defaultdict(lambda: (0, 0))
    for producer_report in reports:
        for org, (compute, connections) in producer_report["expected"].items():
            previous = expected[org]
            expected[org] = (previous[0] + compute, previous[1] + connections)
    expected = dict(expected)
    problems = check_billing(events, expected)
    if not report.succeeded:
        problems.append(f"the drain did not succeed: {report.errors[:3]}")
    if UsageBucket.objects.exists():
        problems.append(f"{UsageBucket.objects.count()} rows are still in the buffer after the drain")
    if DeliveredEvent.objects.count() != len(events):
        problems.append(f"{DeliveredEvent.objects.count()} ledger entries for {len(events)} captured events")
    dropped = sum(r["stats"].get("dropped", 0) + r["stats"].get("invalid", 0) for r in reports)
    if dropped:
        problems.append(f"the clients dropped or rejected {dropped} connection ends")

    sustained = args.connections / (published - started)
    calls_only = args.connections / (recorded - started)
    tail = published - recorded
    kept_up = tail <= 2 * args.flush_seconds
    worker_rss = {pid: samples for pid, samples in sampler.samples.items() if samples}
    print(
        f"recording: record() calls took {recorded - started:.2f} s ({calls_only:,.0f}/s); the clients had folded "
        f"and published everything {published - started:.2f} s after the start ({sustained:,.0f}/s), "
        f"{tail:.2f} s after the last call"
    )
    for producer_report in sorted(reports, key=lambda item: item["index"]):
        stats = producer_report["stats"]
        print(
            f"  producer {producer_report['index']}: recorded {stats.get('recorded', 0):,}, published "
            f"{stats.get('published_rows', 0):,} rows in {stats.get('published_messages', 0):,} messages, "
            f"publish failures {stats.get('publish_failures', 0)}, dropped {stats.get('dropped', 0)}, "
            f"resent {stats.get('resent_messages', 0)}, max queued {producer_report['max_queued']:,}, "
            f"published {producer_report['published'] - producer_report['started']:.2f} s and confirmed "
            f"{producer_report['confirmed'] - producer_report['started']:.2f} s after the start"
        )
    print(
        f"buffer: all {applied:,} connections applied {applied_at - started:.2f} s after the start, "
        f"in {rows_in_buffer:,} rows"
    )
    print(
        f"drain: {report.delivered_events:,} events in {report.requests} requests, {report.duration_ms / 1000:.2f} s; "
        f"all delivered {delivered_at - started:.2f} s after the start"
    )
    for pid, samples in worker_rss.items():
        print(
            f"worker {pid} RSS: {samples[0] / 2**20:.1f} MiB at start, max {max(samples) / 2**20:.1f} MiB, "
            f"last {samples[-1] / 2**20:.1f} MiB ({len(samples)} samples)"
        )
    print(f"billing: {'exact for every org' if not problems else '; '.join(problems)}")
    sys.stdout.flush()

    max_rss = max((max(samples) for samples in worker_rss.values()), default=0)
    if args.rate:
        # Paced: the figure is the rate the calls kept. It counts only if the clients kept up, that is
        # if they published everything at most two flush intervals after the last call.
        recorded_figure = common.Result(
            "end_to_end",
            f"connection ends/s recorded (paced), {args.producers} processes",
            calls_only,
            "/s",
            None,
            None,
            f">= {TARGET_RECORDED_PER_SECOND:,}/s, tail <= {2 * args.flush_seconds:g} s",
            calls_only >= TARGET_RECORDED_PER_SECOND and kept_up,
        )
        print(f"clients kept up with the offered rate: {kept_up} (tail {tail:.2f} s)")
    else:
        recorded_figure = common.Result(
            "end_to_end",
            f"connection ends/s recorded and published, {args.producers} processes",
            sustained,
            "/s",
            None,
            None,
            f">= {TARGET_RECORDED_PER_SECOND:,}/s",
            sustained >= TARGET_RECORDED_PER_SECOND,
        )
    return [
        recorded_figure,
        common.Result(
            "end_to_end",
            f"seconds until all {args.connections:,} delivered",
            delivered_at - started,
            "s",
        ),
        common.Result("end_to_end", "billed == expected, per org", float(not problems), "bool", None, None,
                      "exact, nothing lost", not problems),
        common.Result("end_to_end", "worker max RSS", max_rss / 2**20, "MiB"),
    ]


def add_arguments(parser):
    parser.add_argument("--connections", type=int, default=200_000, help="connection ends in total (default 200000)")
    parser.add_argument("--orgs", type=int, default=10_000, help="distinct orgs (default 10000)")
    parser.add_argument("--producers", type=int, default=2, help="control-plane processes (default 2)")
    parser.add_argument("--workers", type=int, default=1, help="celery worker processes (default 1)")
    parser.add_argument(
        "--rate", type=float, default=0, help="connection ends per second offered in total; 0 = as fast as possible"
    )
    parser.add_argument(
        "--flush-seconds", type=float, default=2.0, help="the clients' flush interval in seconds (default 2)"
    )
    parser.add_argument("--seed", type=int, default=7, help="random seed of the workload")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for each phase (default 600)")


def main(argv=None):
    common.run_main(argv, "python -m bench.end_to_end", "Run the pipeline end to end and check the bill.", add_arguments, run)


if __name__ == "__main__":
    main()
