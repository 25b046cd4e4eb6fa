"""Apply usage increments to the buffer, idempotently and atomically.

Each message is applied in one transaction that first records the message's id
(and the id of every connection it carries) in AppliedMessage. A redelivered
message or connection finds its id already there and adds nothing. The
increments themselves are one multi-row ``INSERT ... ON CONFLICT DO UPDATE``
on the open row of each (org, bucket), so concurrent workers never lose an
update to a read-modify-write race.
"""

import logging

from django.db import connection, transaction
from django.utils import timezone

from metering.connections import unstorable_text_problem
from metering.models import REASON_COLUMNS, AppliedMessage, UsageBucket
from metering.units import END_REASONS

logger = logging.getLogger(__name__)

UPSERT_CHUNK_ROWS = 500
_COUNTER_COLUMNS = ("compute_milli", "cpu_milli", "memory_milli", "connections", *REASON_COLUMNS)
_INSERT_COLUMNS = (
    "org_id",
    "bucket_start",
    "bucket_seconds",
    "state",
    *_COUNTER_COLUMNS,
    "created_at",
    "attempts",
    "last_error",
)
# PostgreSQL array types of _INSERT_COLUMNS, in the same order.
_INSERT_ARRAY_TYPES = (
    "text[]",
    "bigint[]",
    "integer[]",
    "text[]",
    *("bigint[]" for _ in _COUNTER_COLUMNS),
    "timestamptz[]",
    "integer[]",
    "text[]",
)


class InvalidMessage(ValueError):
    """A message body that cannot be applied; the message names the bad field."""


def apply_batch(batch_id, rows):
    """Apply one batch of usage rows unless its batch id was applied before.

    Rows that carry a ``connection_id`` are also applied at most once per
    connection id. Returns the number of rows applied (0 for a redelivery).
    Raises InvalidMessage, before writing anything, when a row is malformed.
    """
    if not isinstance(batch_id, str) or not batch_id or len(batch_id) > _MAX_TEXT_ID_LENGTH:
        raise InvalidMessage(f"invalid batch_id {batch_id!r}; expected a string of 1 to 200 characters")
    problem = unstorable_text_problem(batch_id)
    if problem:
        raise InvalidMessage(f"invalid batch_id {batch_id!r}: {problem}")
    if not isinstance(rows, list):
        raise InvalidMessage(
            f"invalid rows {repr(rows)[:100]} of type {type(rows).__name__}; expected a list of row objects"
        )
    rows = [_validate_row(index, row) for index, row in enumerate(rows)]

    with transaction.atomic():
        if not claim_message_keys([f"batch:{batch_id}"]):
            return 0
        return _apply_rows_once(rows)


def apply_connection_rows(rows):
    """Apply rows that each carry a ``connection_id``, each at most once.

    Returns the number of rows applied; raises InvalidMessage before writing
    anything when a row is malformed or has no connection id.
    """
    rows = [_validate_row(index, row) for index, row in enumerate(rows)]
    for index, row in enumerate(rows):
        if not row.get("connection_id"):
            raise InvalidMessage(f"row {index} has no connection_id")
    with transaction.atomic():
        return _apply_rows_once(rows)


def _apply_rows_once(rows):
    keys = [connection_key(row["connection_id"]) for row in rows if row.get("connection_id")]
    if keys:
        # A key claimed here is applied once even if the batch repeats it.
        unclaimed = claim_message_keys(keys)
        applied = []
        for row in rows:
            if row.get("connection_id"):
                key = connection_key(row["connection_id"])
                if key not in unclaimed:
                    continue
                unclaimed.discard(key)
            applied.append(row)
        rows = applied
    upsert_rows(rows)
    return len(rows)


def connection_key(connection_id):
    return f"conn:{connection_id}"


def claim_message_keys(keys):
    """Insert message keys; return the set of keys that were not there before."""
    # Sorted, so transactions that share keys wait for each other instead of deadlocking.
    keys = sorted(set(keys))
    claimed = set()
    now = timezone.now()
    table = AppliedMessage._meta.db_table
    with connection.cursor() as cursor:
        for start in range(0, len(keys), UPSERT_CHUNK_ROWS):
            chunk = keys[start : start + UPSERT_CHUNK_ROWS]
            placeholders = ", ".join(["(%s, %s)"] * len(chunk))
            params = [value for key in chunk for value in (key, now)]
            cursor.execute(
                f"INSERT INTO {table} (key, applied_at) VALUES {placeholders} "
                "ON CONFLICT (key) DO NOTHING RETURNING key",
                params,
            )
            claimed.update(row[0] for row in cursor.fetchall())
    return claimed


def upsert_rows(rows):
    """Add each row's counters to the open row of its (org, bucket), creating it if needed.

    On PostgreSQL each chunk goes as one array per column through ``unnest``,
    so the statement text stays the same whatever the chunk size. A multi-row
    VALUES list of 500 rows is an 8,500-placeholder statement that psycopg
    re-parses in Python on every execute and PostgreSQL re-parses and plans,
    which was most of a worker's time per batch. Other databases (SQLite)
    get the VALUES form.
    """
    # One lock order for every transaction: two workers that upsert the same rows in different
    # orders deadlock, and PostgreSQL then aborts one of them.
    merged = sorted(_merge_rows(rows), key=lambda row: (row["org_id"], row["bucket_start"]))
    if not merged:
        return
    table = UsageBucket._meta.db_table
    now = timezone.now()
    columns = ", ".join(_INSERT_COLUMNS)
    updates = ", ".join(f"{column} = {table}.{column} + EXCLUDED.{column}" for column in _COUNTER_COLUMNS)
    conflict = f"ON CONFLICT (org_id, bucket_start) WHERE state = 'open' DO UPDATE SET {updates}"
    row_placeholder = "(" + ", ".join(["%s"] * len(_INSERT_COLUMNS)) + ")"
    arrays = ", ".join(f"%s::{array_type}" for array_type in _INSERT_ARRAY_TYPES)
    with connection.cursor() as cursor:
        for start in range(0, len(merged), UPSERT_CHUNK_ROWS):
            chunk = merged[start : start + UPSERT_CHUNK_ROWS]
            values = [_insert_values(row, now) for row in chunk]
            if connection.vendor == "postgresql":
                cursor.execute(
                    f"INSERT INTO {table} ({columns}) SELECT * FROM unnest({arrays}) {conflict}",
                    [list(column) for column in zip(*values)],
                )
            else:
                cursor.execute(
                    f"INSERT INTO {table} ({columns}) VALUES {', '.join([row_placeholder] * len(chunk))} {conflict}",
                    [value for row in values for value in row],
                )


def _insert_values(row, now):
    reasons = row["end_reasons"]
    return [
        row["org_id"],
        row["bucket_start"],
        row["bucket_seconds"],
        UsageBucket.State.OPEN,
        row["compute_milli"],
        row["cpu_milli"],
        row["memory_milli"],
        row["connections"],
        *(reasons.get(reason, 0) for reason in END_REASONS),
        now,
        0,
        "",
    ]


def _merge_rows(rows):
    """Sum rows with the same (org, bucket), because one statement may not update a row twice."""
    merged = {}
    for row in rows:
        key = (row["org_id"], row["bucket_start"])
        existing = merged.get(key)
        if existing is None:
            merged[key] = {**row, "end_reasons": dict(row["end_reasons"])}
            continue
        for field in ("compute_milli", "cpu_milli", "memory_milli", "connections"):
            existing[field] += row[field]
        for reason, count in row["end_reasons"].items():
            existing["end_reasons"][reason] = existing["end_reasons"].get(reason, 0) + count
    return list(merged.values())


# The largest value each integer field's column can store: bucket_seconds is an integer, the rest bigint.
_ROW_INTEGER_MAXIMUMS = {
    "bucket_start": 2**63 - 1,
    "bucket_seconds": 2**31 - 1,
    "compute_milli": 2**63 - 1,
    "cpu_milli": 2**63 - 1,
    "memory_milli": 2**63 - 1,
    "connections": 2**63 - 1,
}
_MAX_TEXT_ID_LENGTH = 200


def _validate_row(index, row):
    if not isinstance(row, dict):
        raise InvalidMessage(f"row {index} is {type(row).__name__}; expected an object")
    org_id = row.get("org_id")
    if not isinstance(org_id, str) or not org_id or len(org_id) > _MAX_TEXT_ID_LENGTH:
        raise InvalidMessage(f"row {index} has invalid org_id {org_id!r}; expected a string of 1 to 200 characters")
    problem = unstorable_text_problem(org_id)
    if problem:
        raise InvalidMessage(f"row {index} has invalid org_id {org_id!r}: {problem}")

    for field, maximum in _ROW_INTEGER_MAXIMUMS.items():
        value = row.get(field)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InvalidMessage(f"row {index} has invalid {field} {value!r}; expected a non-negative integer")
        if value > maximum:
            raise InvalidMessage(f"row {index} has invalid {field} {value!r}; the maximum is {maximum}")
    if row["bucket_seconds"] == 0:
        raise InvalidMessage(f"row {index} has bucket_seconds 0; expected a positive integer")

    reasons = row.get("end_reasons")
    if not isinstance(reasons, dict):
        raise InvalidMessage(f"row {index} has invalid end_reasons {reasons!r}; expected an object of counts")
    for reason, count in reasons.items():
        if reason not in END_REASONS:
            raise InvalidMessage(
                f"row {index} has unknown end reason {reason!r}; accepted reasons are {', '.join(END_REASONS)}"
            )
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise InvalidMessage(f"row {index} has invalid count {count!r} for end reason {reason!r}")

    connection_id = row.get("connection_id")
    if connection_id is not None:
        if not isinstance(connection_id, str) or not connection_id or len(connection_id) > _MAX_TEXT_ID_LENGTH:
            raise InvalidMessage(
                f"row {index} has invalid connection_id {connection_id!r}; expected a string of 1 to 200 characters"
            )
        problem = unstorable_text_problem(connection_id)
        if problem:
            raise InvalidMessage(f"row {index} has invalid connection_id {connection_id!r}: {problem}")
    return row


def delete_expired_message_keys(older_than):
    """Forget applied message ids older than the retention; returns how many were deleted."""
    deleted, _ = AppliedMessage.objects.filter(applied_at__lt=older_than).delete()
    return deleted
