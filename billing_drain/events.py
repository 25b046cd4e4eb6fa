"""The PostHog capture event for one sealed buffer row."""

import uuid
from datetime import datetime, timezone
from decimal import Decimal

from django.conf import settings

from metering.units import milli_to_decimal

# Fixed forever: changing it would give already-shipped buckets new uuids and
# bill them twice.
EVENT_UUID_NAMESPACE = uuid.UUID("6f1c5c2e-8b7a-4d0e-9a51-3f0c2d7e4b19")


def event_uuid(org_id, bucket_start, generation):
    """Derive the event uuid from (org, bucket_start, generation), so a re-ship reuses it."""
    return uuid.uuid5(EVENT_UUID_NAMESPACE, f"{org_id}\n{bucket_start}\n{generation}")


# Every decimal of at most 15 significant digits survives a round trip through
# a binary64 float and its shortest repr (DBL_DIG is 15), so below this bound
# ``milli / 1000`` is the exact decimal and the Decimal check can be skipped.
_FLOAT_EXACT_MILLI_BOUND = 10**15


def exact_number(milli):
    """Return thousandths as a JSON number whose text is the exact decimal.

    A float is used only when its shortest repr is exactly the decimal (true
    for up to 15 significant digits, about 10^12 seconds), so the JSON text
    reads "4.657". Larger values go as a decimal string rather than rounded.
    """
    if -_FLOAT_EXACT_MILLI_BOUND < milli < _FLOAT_EXACT_MILLI_BOUND:
        # Integer true division is correctly rounded, as is float(Decimal).
        return milli / 1000
    return decimal_number(milli_to_decimal(milli))


def decimal_number(exact):
    as_float = float(exact)
    if Decimal(repr(as_float)) == exact:
        return as_float
    return str(exact)


def bucket_start_iso(bucket_start):
    return datetime.fromtimestamp(bucket_start, timezone.utc).isoformat()


def build_event(row):
    """Build the capture event for a sealed row (a UsageBucket or a SealedRow)."""
    [event] = build_events([row])
    return event


def build_events(rows):
    """Build the capture events for sealed rows, in order.

    The settings values and each bucket start's ISO text are computed once per
    call rather than per row, because the drain builds hundreds per request.
    """
    event_name = settings.METERING_EVENT_NAME
    memory_per_core_gib = decimal_number(settings.METERING_MEMORY_PER_CORE_GIB)
    timestamps = {}
    events = []
    for row in rows:
        timestamp = timestamps.get(row.bucket_start)
        if timestamp is None:
            timestamp = timestamps[row.bucket_start] = bucket_start_iso(row.bucket_start)
        events.append(
            {
                "event": event_name,
                "distinct_id": row.org_id,
                "uuid": str(row.event_uuid),
                "timestamp": timestamp,
                "properties": {
                    "compute_seconds": exact_number(row.compute_milli),
                    "cpu_seconds": exact_number(row.cpu_milli),
                    "memory_gib_seconds": exact_number(row.memory_milli),
                    "compute_milli": row.compute_milli,
                    "connections": row.connections,
                    "end_reasons": row.end_reasons(),
                    "bucket_start": timestamp,
                    "bucket_seconds": row.bucket_seconds,
                    "memory_per_core_gib": memory_per_core_gib,
                    "generation": row.generation,
                    # Usage events describe an org, not a person: no person profile.
                    "$process_person_profile": False,
                },
            }
        )
    return events
