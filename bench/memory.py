"""Memory: bytes the metering client keeps per pending (org, bucket) key while the broker is down.

The client records one connection end for each of ``--keys`` distinct orgs
(so ``--keys`` distinct (org, bucket) keys) with a publish function that
raises ConnectionRefusedError, as kombu does when Redis refuses connections.
The org id strings are created inside the measurement, as a control plane's
connection objects would create them, so the client's references to them count.

Three states are measured, each as the growth of the Python heap divided by
the number of keys (or connections):
- queued: after the ``record`` calls, before the flusher folds them (per connection);
- folded: after folding into one aggregate row per key, before a publish attempt;
- after a failed publish: the rows frozen into batches that wait for the
  broker, which is where every pending key ends up during an outage.

Method: ``tracemalloc`` counts the bytes of live Python allocations (objects
and their containers, without allocator overhead) after ``gc.collect()``. As a
cross-check the same steps run again in a fresh process without tracemalloc,
and its resident set size (VmRSS in /proc/self/status) is read at each step.
RSS includes the allocator's arenas and pages freed but not returned, so it is
coarser, and it is an upper bound.

Run: python -m bench.memory [--keys 100000]
"""

import gc
import multiprocessing
import tracemalloc

from bench import common

TARGET_BYTES_PER_KEY = 300
STATES = ("queued", "folded", "after a failed publish")


def publish_refused(batch_id, rows, timeout_seconds):
    raise ConnectionRefusedError(111, "Connection refused (broker down, simulated)")


def new_client():
    from metering.client import MeteringClient

    return MeteringClient(
        bucket_seconds=60,
        memory_per_core_gib=2,
        max_connection_seconds=31 * 86400,
        flush_seconds=3600,
        max_pending_keys=10_000_000,
        publish=publish_refused,
        register_exit_flush=False,
    )


def measure_steps(keys, reader):
    """Run the three steps with ``reader()`` returning bytes in use; return the growth after each step."""
    client = new_client()
    gc.collect()
    before = reader()

    for number in range(keys):
        client.record(f"org-{number:07d}", "2", "4Gi", None, None, 1.5)
    gc.collect()
    queued = reader() - before

    # The client has no public way to fold without publishing. Its flusher would fold,
    # but it waits an hour (flush_seconds) in this benchmark.
    with client._flush_lock:
        client._fold_incoming()
    gc.collect()
    folded = reader() - before

    client.flush()
    gc.collect()
    frozen = reader() - before

    stats = client.stats()
    client.close(timeout=0)
    return {"queued": queued, "folded": folded, "after a failed publish": frozen}, stats


def measure_steps_quietly(keys, reader):
    # The client logs the failed publish and, at close(), the rows it leaves behind: both are expected here.
    with common.quiet_logger("metering.client"):
        return measure_steps(keys, reader)


def traced_bytes():
    return tracemalloc.get_traced_memory()[0]


def measure_with_tracemalloc(keys):
    tracemalloc.start()
    try:
        return measure_steps_quietly(keys, traced_bytes)
    finally:
        tracemalloc.stop()


def _measure_rss_in_child(keys, results):
    common.setup_child_process()
    import os

    growth, stats = measure_steps_quietly(keys, lambda: common.rss_bytes(os.getpid()))
    results.put((growth, stats))


def measure_rss(keys):
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=_measure_rss_in_child, args=(keys, results))
    process.start()
    growth = results.get(timeout=600)
    process.join(60)
    return growth


def run(args):
    print(f"\n== memory: the client's bytes per pending key, {args.keys:,} distinct (org, bucket) keys, broker down ==")
    traced, stats = measure_with_tracemalloc(args.keys)
    rss, _ = measure_rss(args.keys)
    print(
        f"client stats after the failed publish: recorded {stats.get('recorded', 0):,}, pending rows "
        f"{stats.get('pending_rows', 0):,}, publish failures {stats.get('publish_failures', 0)}, "
        f"dropped {stats.get('dropped', 0)}"
    )
    print("state                    tracemalloc bytes/key   RSS bytes/key")
    for state in STATES:
        print(f"{state:<24} {traced[state] / args.keys:>21,.0f}   {rss[state] / args.keys:>13,.0f}")
    per_key = traced["after a failed publish"] / args.keys
    return [
        common.Result(
            "memory",
            "client bytes per pending key, broker down",
            per_key,
            "bytes",
            None,
            None,
            f"<= {TARGET_BYTES_PER_KEY} bytes",
            per_key <= TARGET_BYTES_PER_KEY,
        ),
        common.Result(
            "memory", "client bytes per queued connection (before folding)", traced["queued"] / args.keys, "bytes"
        ),
        common.Result(
            "memory", "client RSS bytes per pending key, broker down", rss["after a failed publish"] / args.keys, "bytes"
        ),
    ]


def add_arguments(parser):
    parser.add_argument("--keys", type=int, default=100_000, help="distinct (org, bucket) keys (default 100000)")


def main(argv=None):
    common.run_main(argv, "python -m bench.memory", "Measure the client's memory per pending key.", add_arguments, run)


if __name__ == "__main__":
    main()
