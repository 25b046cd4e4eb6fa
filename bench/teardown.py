"""Teardown cost: the time one ``MeteringClient.record`` call takes, with the broker up, down and frozen.

Two threads call ``record`` at once, as a control plane's connection handlers
would, and each call is timed on its own with ``time.perf_counter_ns``. The
baseline is a bare dict increment under a ``threading.Lock`` on the same org
keys, timed the same way by the same threads. It is measured again before
each broker state, so drift on a shared machine affects both sides alike.

The client's flusher thread runs during the measurement (every
``--flush-seconds``) and folds and publishes in the same process, so its work
competes with the callers for the GIL. The broker is a redis-server of this
benchmark on a free 127.0.0.1 port: it is stopped with SIGSTOP for "frozen"
and terminated for "down".

Run: python -m bench.teardown [--calls 200000] [--threads 2]
"""

import array
import functools
import random
import sys
import threading
import time

from bench import common

BROKER_STATES = ("up", "frozen", "down")
MEDIAN_RATIO_TARGET = 3.0
P99_TARGET_NS = 20_000
PACING_GROUP = 100
SIZES = (("8", "16Gi"), ("2", "4Gi"), ("500m", "3Gi"), ("8", "64Gi"))


def build_workload(calls, threads, orgs, seed=11):
    """Return one list of (org, cores, memory, duration) per thread, made before any timing."""
    rng = random.Random(seed)
    org_ids = [f"org-{index:06d}" for index in range(orgs)]
    work = []
    for index in range(calls):
        cores, memory = SIZES[index % len(SIZES)]
        work.append((rng.choice(org_ids), cores, memory, rng.randrange(0, 600_000) / 1000))
    return [work[start::threads] for start in range(threads)]


def time_calls(function, slices, rate=0):
    """Call ``function`` for every item, one thread per slice; return (sorted ns per call, wall seconds).

    With ``rate`` (calls per second over all threads), each thread sleeps
    between groups of calls to keep to its share. No sample includes a sleep.
    """
    barrier = threading.Barrier(len(slices) + 1)
    samples = [array.array("q", bytes(8 * len(part))) for part in slices]
    seconds_per_call = len(slices) / rate if rate else 0.0

    def run(part, out):
        clock = time.perf_counter_ns
        barrier.wait()
        started_at = time.perf_counter()
        for index, (org, cores, memory, duration) in enumerate(part):
            if seconds_per_call and index % PACING_GROUP == 0:
                ahead = started_at + index * seconds_per_call - time.perf_counter()
                if ahead > 0:
                    time.sleep(ahead)
            started = clock()
            function(org, cores, memory, None, None, duration)
            out[index] = clock() - started

    threads = [threading.Thread(target=run, args=(part, out)) for part, out in zip(slices, samples)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    merged = sorted(value for out in samples for value in out)
    return merged, wall


def _rate_text(rate):
    return f"{rate:,.0f} calls/s" if rate else "full speed"


def make_baseline():
    lock = threading.Lock()
    counts = {}

    def increment(org_id, cores, memory, started_at=None, ended_at=None, duration_seconds=None):
        with lock:
            counts[org_id] = counts.get(org_id, 0) + 1

    return increment


def _no_op(org_id, cores, memory, started_at=None, ended_at=None, duration_seconds=None):
    return None


def summarise(samples):
    return {
        "median": common.percentile(samples, 0.5),
        "p99": common.percentile(samples, 0.99),
        "p999": common.percentile(samples, 0.999),
        "max": samples[-1],
    }


def new_client(publish, flush_seconds):
    from metering.client import MeteringClient

    return MeteringClient(
        bucket_seconds=60,
        memory_per_core_gib=2,
        max_connection_seconds=31 * 86400,
        flush_seconds=flush_seconds,
        publish=publish,
        register_exit_flush=False,
    )


def run(args):
    # With the broker frozen or down, the client logs each failed publish and the rows close() gives up.
    # The table counts the failures instead.
    with common.quiet_logger("metering.client"):
        return _run(args)


def _run(args):
    from metering.client import publish_with_celery

    slices = build_workload(args.calls, args.threads, args.orgs)
    print(
        f"\n== teardown: MeteringClient.record, {args.calls:,} calls per measurement from "
        f"{args.threads} threads at {_rate_text(args.rate)}, {args.orgs:,} orgs, flusher every {args.flush_seconds} s =="
    )
    floor, _ = time_calls(_no_op, slices, args.rate)
    print(f"timer floor (an empty function timed the same way): median {common.percentile(floor, 0.5)} ns")

    redis = common.PrivateRedis(common.data_dir() / "teardown-redis").start()
    app = common.celery_app(redis.url, name="bench-teardown")
    publish = functools.partial(publish_with_celery, app=app, queue="bench-teardown")
    results = []
    rows = []
    frozen_client = None
    try:
        for state in BROKER_STATES:
            if state == "frozen":
                redis.freeze()
            elif state == "down":
                redis.thaw()
                if frozen_client is not None:
                    # Let the frozen state's client publish what it held, so its flusher is idle.
                    frozen_client.close(timeout=10)
                redis.stop()

            baseline_samples, baseline_wall = time_calls(make_baseline(), slices, args.rate)
            client = new_client(publish, args.flush_seconds)
            client_samples, client_wall = time_calls(client.record, slices, args.rate)
            stats = client.stats()
            if state == "frozen":
                frozen_client = client
            else:
                # With the broker up, everything must be published before the next state starts.
                client.close(timeout=60 if state == "up" else 0.5)
                stats = {**stats, "published_rows_after_close": client.stats().get("published_rows", 0)}

            baseline = summarise(baseline_samples)
            measured = summarise(client_samples)
            rows.append((state, baseline, measured, baseline_wall, client_wall, stats))
            median_ratio = measured["median"] / baseline["median"]
            results.append(
                common.Result(
                    "teardown",
                    f"record median, broker {state}",
                    measured["median"],
                    "ns",
                    baseline["median"],
                    median_ratio,
                    f"<= {MEDIAN_RATIO_TARGET:g}x baseline",
                    median_ratio <= MEDIAN_RATIO_TARGET,
                )
            )
            results.append(
                common.Result(
                    "teardown",
                    f"record p99, broker {state}",
                    measured["p99"],
                    "ns",
                    baseline["p99"],
                    measured["p99"] / baseline["p99"],
                    f"<= {P99_TARGET_NS:,} ns",
                    measured["p99"] <= P99_TARGET_NS,
                )
            )
    finally:
        redis.stop()
        if frozen_client is not None:
            frozen_client.close(timeout=0.5)
        app.close()

    header = (
        "state", "base med", "base p99", "med", "p99", "p99.9", "max", "med ratio",
        "base calls/s", "calls/s", "folded", "queued", "publish fails", "dropped", "rows published",
    )
    table = [header]
    for state, baseline, measured, baseline_wall, client_wall, stats in rows:
        table.append(
            (
                state,
                f"{baseline['median']:,}",
                f"{baseline['p99']:,}",
                f"{measured['median']:,}",
                f"{measured['p99']:,}",
                f"{measured['p999']:,}",
                f"{measured['max']:,}",
                f"{measured['median'] / baseline['median']:.2f}",
                f"{args.calls / baseline_wall:,.0f}",
                f"{args.calls / client_wall:,.0f}",
                f"{stats.get('recorded', 0):,}",
                f"{stats.get('queued_connections', 0):,}",
                f"{stats.get('publish_failures', 0):,}",
                f"{stats.get('dropped', 0):,}",
                f"{stats.get('published_rows_after_close', 0):,}",
            )
        )
    widths = [max(len(row[column]) for row in table) for column in range(len(header))]
    print(
        "per call in ns; 'base' is the dict-under-lock baseline; folded, queued, publish fails and dropped "
        "are client stats at the end of the calls, rows published is after close()"
    )
    for row in table:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))
    sys.stdout.flush()
    return results


def add_arguments(parser):
    parser.add_argument("--calls", type=int, default=200_000, help="calls per measurement, split over the threads")
    parser.add_argument("--threads", type=int, default=2, help="threads calling at once (default 2)")
    parser.add_argument("--orgs", type=int, default=10_000, help="distinct org ids in the workload")
    parser.add_argument(
        "--rate",
        type=float,
        default=50_000,
        help="calls per second over all threads, paced in groups of 100 so that the flusher keeps up "
        "as in steady operation; 0 calls as fast as possible (default 50000)",
    )
    parser.add_argument(
        "--flush-seconds",
        type=float,
        default=0.1,
        help="the client's flush interval in seconds; the default 0.1 makes the flusher run during the "
        "measurement (production default: 2)",
    )


def main(argv=None):
    common.run_main(argv, "python -m bench.teardown", "Time MeteringClient.record per call.", add_arguments, run)


if __name__ == "__main__":
    main()
