"""Drain: events delivered per second to a local capture server, against a bare HTTP poster and a batch of one.

The buffer is filled with ``--rows`` open rows (one per org, in a bucket that
closed ten minutes ago) through ``metering.buffer.upsert_rows``. Then:

1. ``billing_drain.services.drain`` seals and ships them with the PostHog
   transport (``posthog.request.batch_post``, gzip) in batches of
   ``--batch-size`` to ``python -m tests.capture_server`` on 127.0.0.1, which
   runs in a process of its own. The rate is events delivered divided by the
   drain's duration: seal, page queries, building events, HTTP, deleting the
   rows and writing the ledger.
2. The baseline: one ``requests.Session`` posts the same events, read back from
   the capture server's events file, to the same server in batches of the same
   size. Each body is built as batch_post builds it: JSON with ``api_key`` and
   ``sent_at``, gzip level 9. JSON encoding and gzip are inside the timing.
3. The same drain with a batch size of one over ``--single-rows`` rows.

Steps 1 and 2 alternate for ``--repeats`` rounds and the medians are
compared, so that load from other programs on the machine falls on both.
The capture server runs with TCP_NODELAY (see bench/capture.py).

Run: python -m bench.drain [--rows 10000] [--batch-size 500] [--single-rows 1000]
"""

import gzip
import json
import statistics
import time
from datetime import datetime, timezone

from bench import common

BARE_RATIO_TARGET = 0.5
SINGLE_RATIO_TARGET = 20


def fill_buffer(rows, org_prefix):
    """Insert ``rows`` open rows, one per org, in a bucket that closed ten minutes ago."""
    from metering import buffer

    bucket_start = (int(time.time()) // 60 - 10) * 60
    buffer.upsert_rows(
        [
            {
                "org_id": f"{org_prefix}-{number:06d}",
                "bucket_start": bucket_start,
                "bucket_seconds": 60,
                "compute_milli": 1000 + number,
                "cpu_milli": 500 + number % 97,
                "memory_milli": 2000 + number % 89,
                "connections": 1 + number % 7,
                "end_reasons": {"client_disconnect": 1 + number % 7},
            }
            for number in range(rows)
        ]
    )


class TimedTransport:
    """The PostHog transport, adding up the seconds its ``send`` calls take."""

    def __init__(self, url):
        from billing_drain.transport import PostHogTransport

        self._transport = PostHogTransport(common.CAPTURE_API_KEY, url, 30)
        self.send_seconds = 0.0

    @property
    def destination(self):
        return self._transport.destination

    def send(self, events):
        started = time.perf_counter()
        try:
            self._transport.send(events)
        finally:
            self.send_seconds += time.perf_counter() - started


def timed_drain(url, batch_size):
    """Run one drain; return (report, seconds, seconds spent in the transport's send)."""
    from billing_drain import services

    transport = TimedTransport(url)
    started = time.perf_counter()
    report = services.drain(transport=transport, batch_size=batch_size)
    elapsed = time.perf_counter() - started
    if not report.succeeded:
        raise RuntimeError(f"the drain did not succeed: {report.errors[:3]}")
    return report, elapsed, transport.send_seconds


def bare_post(url, events, batch_size):
    """Post ``events`` in batches with one requests.Session as batch_post would; return seconds taken."""
    import requests

    session = requests.Session()
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    started = time.perf_counter()
    for start in range(0, len(events), batch_size):
        body = {
            "batch": events[start : start + batch_size],
            "sent_at": datetime.now(tz=timezone.utc).isoformat(),
            "api_key": common.CAPTURE_API_KEY,
        }
        response = session.post(
            f"{url}/batch/", data=gzip.compress(json.dumps(body).encode("utf-8")), headers=headers, timeout=30
        )
        if response.status_code != 200:
            raise RuntimeError(f"the capture server responded {response.status_code}: {response.text[:300]}")
    elapsed = time.perf_counter() - started
    session.close()
    return elapsed


def run(args):
    print(
        f"\n== drain: {args.rows:,} events in batches of {args.batch_size} to a local capture server, against a "
        f"bare requests.Session poster ({args.repeats} rounds, medians), and {args.single_rows:,} events in "
        f"batches of one =="
    )
    capture_dir = common.data_dir() / "capture-drain"
    drain_rates = []
    bare_rates = []
    with common.CaptureProcess(capture_dir, nagle=args.nagle) as capture:
        for round_number in range(1, args.repeats + 1):
            common.clear_tables()
            fill_buffer(args.rows, "org")
            report, drain_seconds, send_seconds = timed_drain(capture.url, args.batch_size)
            drain_rates.append(report.delivered_events / drain_seconds)
            events = capture.events()[-args.rows :]
            if report.delivered_events != args.rows or len(events) != args.rows:
                raise RuntimeError(
                    f"round {round_number}: the drain delivered {report.delivered_events} events, "
                    f"expected {args.rows}"
                )
            bare_seconds = bare_post(capture.url, events, args.batch_size)
            bare_rates.append(len(events) / bare_seconds)
            print(
                f"round {round_number}: drain {report.delivered_events:,} events in {report.requests} requests, "
                f"{drain_seconds:.2f} s = {drain_rates[-1]:,.0f} events/s ({send_seconds:.2f} s in batch_post, "
                f"{drain_seconds - send_seconds:.2f} s with no request in flight); bare poster {bare_seconds:.2f} s "
                f"= {bare_rates[-1]:,.0f} events/s; ratio {drain_rates[-1] / bare_rates[-1]:.2f}"
            )

        ledger_size, ledger_rows = common.table_bytes("billing_drain_deliveredevent")
        print(f"ledger (DeliveredEvent): {ledger_size / max(ledger_rows, 1):,.0f} bytes per event with indexes")

        common.clear_tables()
        fill_buffer(args.single_rows, "single")
        single_report, single_seconds, _ = timed_drain(capture.url, 1)
        single_rate = single_report.delivered_events / single_seconds
        print(
            f"drain, batch 1: {single_report.delivered_events:,} events in {single_report.requests} requests, "
            f"{single_seconds:.2f} s = {single_rate:,.0f} events/s"
        )

    drain_rate = statistics.median(drain_rates)
    bare_rate = statistics.median(bare_rates)
    bare_ratio = drain_rate / bare_rate
    single_ratio = drain_rate / single_rate
    return [
        common.Result(
            "drain",
            f"events/s, batch {args.batch_size}, vs bare poster",
            drain_rate,
            "events/s",
            bare_rate,
            bare_ratio,
            f">= {BARE_RATIO_TARGET:.0%} of bare",
            bare_ratio >= BARE_RATIO_TARGET,
        ),
        common.Result(
            "drain",
            f"events/s, batch {args.batch_size}, vs batch of one",
            drain_rate,
            "events/s",
            single_rate,
            single_ratio,
            f">= {SINGLE_RATIO_TARGET}x batch of one",
            single_ratio >= SINGLE_RATIO_TARGET,
        ),
    ]


def add_arguments(parser):
    parser.add_argument("--rows", type=int, default=10_000, help="events to drain in batches (default 10000)")
    parser.add_argument("--batch-size", type=int, default=500, help="events per request (default 500, DRAIN_BATCH_SIZE)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="rounds of drain and bare poster; medians are reported (default 3)"
    )
    parser.add_argument(
        "--nagle",
        action="store_true",
        help="keep Nagle's algorithm on in the capture server, as tests.capture_server has it (about 40 ms "
        "more per request)",
    )
    parser.add_argument(
        "--single-rows", type=int, default=1_000, help="events to drain with a batch size of one (default 1000)"
    )


def main(argv=None):
    common.run_main(argv, "python -m bench.drain", "Measure events delivered per second by the drain.", add_arguments, run)


if __name__ == "__main__":
    main()
