"""Increments: buffer rows a real Celery worker applies per second, against a raw psycopg upsert.

The benchmark publishes ``--batches`` messages of ``--rows`` rows each to a
queue of its own, exactly as the client publishes them (``metering.apply_batch``
with a fresh batch id), then starts ``--workers`` real ``celery worker -P solo``
processes with the project's settings. The rows cycle over ``--orgs`` orgs in
one bucket, so the first pass inserts and later passes update, as in steady
operation where each flush adds to the open rows of the current bucket.

The worker's rate comes from the ids that ``apply_batch`` claims in
AppliedMessage: the claim times of the first and the last batch span
``batches - 1`` complete batches, each from one claim to the next (commit,
ack, fetch, decode, validate, claim). Worker start-up is not in it.

The baselines apply the same rows, in the same chunks, to a scratch table of
the same shape (``CREATE TABLE bench_raw (LIKE metering_usagebucket INCLUDING
ALL)``) with one psycopg connection: one transaction per chunk holding one
``INSERT ... ON CONFLICT (org_id, bucket_start) WHERE state = 'open' DO
UPDATE``, with the parameters built from the row dicts inside the timed loop.
They do no claim, no JSON and no broker. There are two: a multi-row VALUES
list, and one array per column through ``unnest``, the statement that
``metering.buffer.upsert_rows`` runs on PostgreSQL. Each ratio is against one.

Run: python -m bench.increments [--batches 200] [--rows 500] [--workers 1]
"""

import datetime
import time
import uuid

from bench import common

TARGET_RATIO = 0.5
RAW_TABLE = "bench_raw"
RAW_FORMS = {
    "values": "one multi-row VALUES list per chunk",
    "unnest": "one array per column through unnest, as upsert_rows does on PostgreSQL",
}
BUCKET_SECONDS = 60


def build_batches(batches, rows_per_batch, orgs, bucket_start):
    """Return ``batches`` lists of row dicts in the client's message format, cycling over the orgs."""
    from metering.units import END_REASONS

    result = []
    serial = 0
    for _ in range(batches):
        rows = []
        for _ in range(rows_per_batch):
            org = serial % orgs
            rows.append(
                {
                    "org_id": f"org-{org:06d}",
                    "bucket_start": bucket_start,
                    "bucket_seconds": BUCKET_SECONDS,
                    "compute_milli": 1000 + serial % 977,
                    "cpu_milli": 500 + serial % 311,
                    "memory_milli": 2000 + serial % 733,
                    "connections": 1 + serial % 5,
                    "end_reasons": {END_REASONS[serial % len(END_REASONS)]: 1 + serial % 5},
                }
            )
            serial += 1
        result.append(rows)
    return result


def expected_totals(batches):
    totals = {}
    for rows in batches:
        for row in rows:
            key = (row["org_id"], row["bucket_start"])
            compute, connections = totals.get(key, (0, 0))
            totals[key] = (compute + row["compute_milli"], connections + row["connections"])
    return totals


def run_raw(database_url, batches, form):
    """Apply the batches with plain psycopg into bench_raw; return (seconds applying, totals by key).

    ``form`` is "values" (one multi-row VALUES list per chunk) or "unnest" (one
    array per column, the statement metering.buffer.upsert_rows runs on PostgreSQL).
    """
    import psycopg

    from metering.units import END_REASONS

    columns = (
        "org_id", "bucket_start", "bucket_seconds", "state", "compute_milli", "cpu_milli", "memory_milli",
        "connections", *(f"ended_{reason}" for reason in END_REASONS), "created_at", "attempts", "last_error",
    )
    array_types = ("text", "bigint", "integer", "text", *["bigint"] * (4 + len(END_REASONS)), "timestamptz",
                   "integer", "text")
    counters = ("compute_milli", "cpu_milli", "memory_milli", "connections", *(f"ended_{r}" for r in END_REASONS))
    updates = ", ".join(f"{column} = {RAW_TABLE}.{column} + EXCLUDED.{column}" for column in counters)
    conflict = f"ON CONFLICT (org_id, bucket_start) WHERE state = 'open' DO UPDATE SET {updates}"
    row_placeholder = "(" + ", ".join(["%s"] * len(columns)) + ")"
    unnest_statement = (
        f"INSERT INTO {RAW_TABLE} ({', '.join(columns)}) "
        f"SELECT * FROM unnest({', '.join(f'%s::{name}[]' for name in array_types)}) {conflict}"
    )
    values_statements = {}

    with psycopg.connect(database_url) as connection:
        connection.execute(f"DROP TABLE IF EXISTS {RAW_TABLE}")
        connection.execute(f"CREATE TABLE {RAW_TABLE} (LIKE metering_usagebucket INCLUDING ALL)")
        connection.commit()
        now = datetime.datetime.now(datetime.timezone.utc)
        started = time.perf_counter()
        for rows in batches:
            values = [
                (
                    row["org_id"], row["bucket_start"], row["bucket_seconds"], "open",
                    row["compute_milli"], row["cpu_milli"], row["memory_milli"], row["connections"],
                    *(row["end_reasons"].get(reason, 0) for reason in END_REASONS), now, 0, "",
                )
                for row in rows
            ]
            if form == "unnest":
                statement = unnest_statement
                params = [list(column) for column in zip(*values)]
            else:
                statement = values_statements.get(len(rows))
                if statement is None:
                    statement = values_statements[len(rows)] = (
                        f"INSERT INTO {RAW_TABLE} ({', '.join(columns)}) "
                        f"VALUES {', '.join([row_placeholder] * len(rows))} {conflict}"
                    )
                params = [value for row in values for value in row]
            with connection.transaction():
                connection.execute(statement, params)
        elapsed = time.perf_counter() - started
        totals = {
            (org, start): (compute, connections)
            for org, start, compute, connections in connection.execute(
                f"SELECT org_id, bucket_start, compute_milli, connections FROM {RAW_TABLE}"
            )
        }
        connection.execute(f"DROP TABLE {RAW_TABLE}")
    return elapsed, totals


def publish_batches(app, queue, batches):
    """Publish each batch as the client does; return the batch ids in order."""
    from metering.client import publish_with_celery

    batch_ids = []
    for rows in batches:
        batch_id = str(uuid.uuid4())
        publish_with_celery(batch_id, rows, 5.0, app=app, queue=queue)
        batch_ids.append(batch_id)
    return batch_ids


def wait_for_claims(batch_ids, timeout_seconds, workers):
    """Wait until every batch id is in AppliedMessage; return (first claim, last claim) datetimes."""
    from metering.models import AppliedMessage

    keys = [f"batch:{batch_id}" for batch_id in batch_ids]
    deadline = time.monotonic() + timeout_seconds
    while True:
        claimed = AppliedMessage.objects.filter(key__in=keys)
        if claimed.count() == len(keys):
            times = sorted(claimed.values_list("applied_at", flat=True))
            return times[0], times[-1]
        for worker in workers:
            if worker.process.poll() is not None:
                raise RuntimeError(f"a worker exited early:\n{worker.log_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"timed out after {timeout_seconds} s: {claimed.count()} of {len(keys)} batches applied"
            )
        time.sleep(0.1)


def buffer_totals():
    from metering.models import UsageBucket

    return {
        (org, start): (compute, connections)
        for org, start, compute, connections in UsageBucket.objects.values_list(
            "org_id", "bucket_start", "compute_milli", "connections"
        )
    }


def run(args):
    if args.batches < 2:
        raise ValueError(
            f"--batches {args.batches} is too small: the rate is measured between the first and the last "
            "claim, so pass at least 2"
        )
    print(
        f"\n== increments: {args.batches} batches of {args.rows} rows over {args.orgs:,} orgs, "
        f"{args.workers} worker(s) -P solo, against a raw psycopg upsert =="
    )
    bucket_start = int(time.time()) // BUCKET_SECONDS * BUCKET_SECONDS
    batches = build_batches(args.batches, args.rows, args.orgs, bucket_start)
    expected = expected_totals(batches)
    total_rows = args.batches * args.rows

    common.clear_tables()
    raw_rates = {}
    for form in RAW_FORMS:
        raw_seconds, raw_totals = run_raw(args.database_url, batches, form)
        raw_rates[form] = total_rows / raw_seconds
        print(
            f"raw psycopg upsert, {RAW_FORMS[form]}: {total_rows:,} rows in {raw_seconds:.2f} s = "
            f"{raw_rates[form]:,.0f} rows/s"
        )
        if raw_totals != expected:
            raise RuntimeError(f"the raw {form} upsert's totals differ from the rows sent; the baseline is wrong")

    queue = f"bench-increments-{uuid.uuid4().hex[:8]}"
    app = common.celery_app(args.redis_url, name="bench-increments")
    workers = []
    try:
        published_at = time.perf_counter()
        batch_ids = publish_batches(app, queue, batches)
        publish_seconds = time.perf_counter() - published_at
        queue_bytes = common.key_memory(args.redis_url, queue)
        print(
            f"published {len(batch_ids)} messages in {publish_seconds:.2f} s "
            f"({total_rows / publish_seconds:,.0f} rows/s); queue length {common.queue_length(args.redis_url, queue)}, "
            f"Redis MEMORY USAGE {queue_bytes / 2**20:.1f} MiB = {queue_bytes / total_rows:,.0f} bytes per row"
        )
        wal_before = common.wal_position()
        started = time.perf_counter()
        workers = common.start_workers(args.workers, queue, "increments")
        ready = time.perf_counter()
        first_claim, last_claim = wait_for_claims(batch_ids, args.timeout, workers)
        done = time.perf_counter()
        wal_bytes = common.wal_position() - wal_before
    finally:
        common.stop_workers(workers)
        common.delete_queue_keys(args.redis_url, queue)
        app.close()

    span = (last_claim - first_claim).total_seconds()
    worker_rate = (args.batches - 1) * args.rows / span
    wall_rate = total_rows / (done - ready)
    totals = buffer_totals()
    exact = totals == expected
    print(
        f"worker: start-up {ready - started:.1f} s; claims of the first and last batch {span:.2f} s apart = "
        f"{worker_rate:,.0f} rows/s; from 'ready' until all applied {done - ready:.2f} s = {wall_rate:,.0f} rows/s"
    )
    print(f"buffer totals equal the rows sent: {exact}")
    buffer_size, buffer_rows = common.table_bytes("metering_usagebucket")
    applied_size, applied_rows = common.table_bytes("metering_appliedmessage")
    print(
        f"PostgreSQL: {wal_bytes / total_rows:,.0f} WAL bytes per row applied (an upper bound: other databases "
        f"of the cluster write WAL too); buffer {buffer_size / max(buffer_rows, 1):,.0f} bytes per row with "
        f"indexes ({buffer_rows:,} rows, dead row versions included); applied message ids "
        f"{applied_size / max(applied_rows, 1):,.0f} bytes per id ({applied_rows:,} ids)"
    )
    if not exact:
        print("the buffer totals differ from the rows sent: the worker lost or repeated increments")
    return [
        common.Result(
            "increments",
            f"rows/s applied, {args.workers} worker(s), vs raw {form}",
            worker_rate,
            "rows/s",
            raw_rates[form],
            worker_rate / raw_rates[form],
            f">= {TARGET_RATIO:.0%} of raw",
            worker_rate / raw_rates[form] >= TARGET_RATIO and exact,
        )
        for form in RAW_FORMS
    ]


def add_arguments(parser):
    parser.add_argument("--batches", type=int, default=200, help="messages to publish (default 200)")
    parser.add_argument("--rows", type=int, default=500, help="rows per message (default 500, the client's)")
    parser.add_argument("--orgs", type=int, default=10_000, help="orgs the rows cycle over (default 10000)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for the worker (default 300)")


def main(argv=None):
    common.run_main(argv, "python -m bench.increments", "Measure buffer rows applied per second.", add_arguments, run)


if __name__ == "__main__":
    main()
