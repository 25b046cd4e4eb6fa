"""Validation of one connection-end fact and its conversion into a buffer row.

Shared by the in-process client and the ``metering.record_connection_end``
task that other languages send by name.
"""

import logging
from datetime import datetime, timezone

from metering import units

logger = logging.getLogger(__name__)

MAX_ORG_ID_LENGTH = 200
MAX_CONNECTION_ID_LENGTH = 200


def new_row(org_id, bucket_start, bucket_seconds, usage, reason):
    return {
        "org_id": org_id,
        "bucket_start": bucket_start,
        "bucket_seconds": bucket_seconds,
        "compute_milli": usage.compute_milli,
        "cpu_milli": usage.cpu_milli,
        "memory_milli": usage.memory_milli,
        "connections": 1,
        "end_reasons": {reason: 1},
    }


def unstorable_text_problem(text):
    """Return why PostgreSQL cannot store ``text`` in a text column, or None when it can."""
    if "\x00" in text:
        return "it contains a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "it contains a lone surrogate, which UTF-8 cannot encode"
    return None


def validate_org_id(org_id):
    if isinstance(org_id, bytes):
        try:
            org_id = org_id.decode("utf-8")
        except UnicodeDecodeError:
            raise units.InvalidUsage(f"invalid org id {org_id!r}: it is not valid UTF-8") from None
    if not isinstance(org_id, str):
        raise units.InvalidUsage(f"invalid org id {org_id!r} of type {type(org_id).__name__}; expected a string")
    if not org_id.strip():
        raise units.InvalidUsage(f"invalid org id {org_id!r}: it is empty")
    if len(org_id) > MAX_ORG_ID_LENGTH:
        raise units.InvalidUsage(
            f"invalid org id {org_id[:40]!r}...: {len(org_id)} characters, the maximum is {MAX_ORG_ID_LENGTH}"
        )
    if "\x00" in org_id or "\ufffd" in org_id:
        raise units.InvalidUsage(f"invalid org id {org_id!r}: it contains a NUL or an undecodable character")
    problem = unstorable_text_problem(org_id)
    if problem:
        raise units.InvalidUsage(f"invalid org id {org_id!r}: {problem}")
    return org_id


def validate_connection_id(connection_id):
    if not isinstance(connection_id, str) or not connection_id.strip():
        raise units.InvalidUsage(f"invalid connection id {connection_id!r}; expected a non-empty string")
    if len(connection_id) > MAX_CONNECTION_ID_LENGTH:
        raise units.InvalidUsage(
            f"invalid connection id {connection_id[:40]!r}...: {len(connection_id)} characters, "
            f"the maximum is {MAX_CONNECTION_ID_LENGTH}"
        )
    problem = unstorable_text_problem(connection_id)
    if problem:
        raise units.InvalidUsage(f"invalid connection id {connection_id!r}: {problem}")
    return connection_id


def resolve_times(started_at, ended_at, duration_seconds, max_connection_seconds):
    """Return (end as epoch seconds, exact duration) from the times a caller gave.

    The duration is ``duration_seconds`` when given, else ``ended_at - started_at``.
    ``ended_at`` may be an aware datetime or epoch seconds (the teardown path
    stamps ``time.time()`` when the caller gave none).
    """
    if isinstance(ended_at, datetime):
        ended_epoch = units.aware_epoch_seconds(ended_at, "ended_at")
    elif isinstance(ended_at, (int, float)) and not isinstance(ended_at, bool):
        ended_epoch = ended_at
    else:
        raise units.InvalidUsage(f"invalid ended_at {ended_at!r}; expected a timezone-aware datetime")

    if duration_seconds is not None:
        return ended_epoch, units.parse_duration_seconds(duration_seconds, max_connection_seconds)
    if started_at is None:
        raise units.InvalidUsage("missing duration: pass duration_seconds, or started_at with ended_at")
    units.aware_epoch_seconds(started_at, "started_at")
    if not isinstance(ended_at, datetime):
        ended_at = datetime.fromtimestamp(ended_epoch, timezone.utc)
    if ended_at < started_at:
        raise units.InvalidUsage(
            f"invalid times: ended_at {ended_at.isoformat()} is before started_at {started_at.isoformat()}"
        )
    return ended_epoch, units.parse_duration_seconds(ended_at - started_at, max_connection_seconds)


def parse_message_time(value, what):
    """Parse an ISO 8601 time with a zone, as non-Python senders pass it; None stays None."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise units.InvalidUsage(f"invalid {what} {value!r}; expected an ISO 8601 string with a zone")
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise units.InvalidUsage(
            f"invalid {what} {value!r}; expected ISO 8601 with a zone such as 2026-12-04T19:29:38.232Z"
        ) from None
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise units.InvalidUsage(
            f"invalid {what} {value!r}: it has no time zone; "
            "send ISO 8601 with a zone such as 2026-12-04T19:29:38.232Z"
        )
    return parsed


def connection_row(
    org_id,
    cores,
    memory,
    *,
    started_at,
    ended_at,
    duration_seconds,
    end_reason,
    connection_id,
    bucket_seconds,
    memory_per_core_gib,
    max_connection_seconds,
):
    """Validate one connection end and return its buffer row; raises InvalidUsage naming the bad value.

    An unknown end reason does not make the connection unbillable: it is
    counted as ``other`` and logged, as the in-process client does.
    """
    org_id = validate_org_id(org_id)
    size = units.parse_worker_size(cores, memory)
    if ended_at is None:
        raise units.InvalidUsage("missing ended_at; pass the connection's end time with a zone")
    ended_epoch, duration = resolve_times(started_at, ended_at, duration_seconds, max_connection_seconds)
    connection_id = validate_connection_id(connection_id)
    if units.normalise_end_reason(end_reason) is None:
        logger.warning(
            "metering recorded unknown end reason %r of connection %r for org %r as 'other'; accepted reasons are %s",
            end_reason,
            connection_id,
            org_id,
            ", ".join(units.END_REASONS),
        )
        end_reason = "other"
    usage = units.connection_usage(size, duration, memory_per_core_gib)
    row = new_row(org_id, units.bucket_start_for(ended_epoch, bucket_seconds), bucket_seconds, usage, end_reason)
    row["connection_id"] = connection_id
    return row
