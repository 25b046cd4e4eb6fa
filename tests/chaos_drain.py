"""A drain subprocess for the chaos harness: the real ``drain_billing`` command with the harness's pause points.

    python -m tests.chaos_drain [--lock-retry-seconds S]
    python -m tests.chaos_drain --until-delivered S
    python -m tests.chaos_drain --ship-now N

The first form runs ``manage.py drain_billing`` in this process, retrying for
up to S seconds while another drain holds the lock, and exits with the
command's exit code. ``--until-delivered`` runs ``drain_with_lock`` every
0.1 s for up to S seconds until one drain delivered an event, so that a pause
point before the delete is reached even while beat's drains compete for the
same rows. ``--ship-now`` seals and ships up to N open buffer rows at once, as
the admin's "ship now" action does. Configuration comes from the environment,
as for manage.py.
"""

import argparse
import os
import sys
import time

EXIT_LOCK_HELD = 3


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tests.chaos_drain")
    parser.add_argument("--lock-retry-seconds", type=float, default=0.0,
                        help="Retry this long while another drain holds the lock (default 0).")
    parser.add_argument("--until-delivered", type=float, metavar="S",
                        help="Drain every 0.1 s for up to S seconds until a drain delivered an event.")
    parser.add_argument("--ship-now", type=int, metavar="N", help="Seal and ship up to N open rows now.")
    args = parser.parse_args(argv)

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings")
    os.environ.setdefault("CHAOS_ROLE", "drain")
    import django

    django.setup()
    import tests.chaos_hooks  # noqa: F401 - installs the pause points

    if args.ship_now:
        return ship_now(args.ship_now)
    if args.until_delivered:
        return drain_until_delivered(args.until_delivered)
    return drain(args.lock_retry_seconds)


def drain(lock_retry_seconds):
    from django.core.management import call_command
    from django.core.management.base import CommandError

    deadline = time.monotonic() + lock_retry_seconds
    while True:
        try:
            call_command("drain_billing")
            return 0
        except CommandError as error:
            if error.returncode == EXIT_LOCK_HELD and time.monotonic() < deadline:
                time.sleep(0.1)
                continue
            print(f"drain_billing: {error}", file=sys.stderr)
            return error.returncode


def drain_until_delivered(seconds):
    from billing_drain import services

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            report = services.drain_with_lock()
        except services.DrainLockHeld:
            report = None
        if report is not None and report.delivered_events:
            print(f"drain: delivered {report.delivered_events}, errors {report.errors}")
            return 0 if report.succeeded else 1
        if report is not None and report.errors:
            print(f"drain: errors {report.errors}; draining again")
        time.sleep(0.1)
    print(f"drain: nothing delivered within {seconds} s")
    return 0


def ship_now(limit):
    from billing_drain import services
    from metering.models import UsageBucket

    row_ids = list(
        UsageBucket.objects.filter(state=UsageBucket.State.OPEN).order_by("?").values_list("id", flat=True)[:limit]
    )
    if not row_ids:
        print("ship now: no open rows")
        return 0
    try:
        report = services.ship_now(row_ids)
    except services.DrainLockHeld as held:
        print(f"ship now: {held}", file=sys.stderr)
        return EXIT_LOCK_HELD
    print(f"ship now: sealed {report.sealed}, delivered {report.delivered_events}, errors {report.errors}")
    return 0 if report.succeeded else 1


if __name__ == "__main__":
    sys.exit(main())
