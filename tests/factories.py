"""Small builders for buffer rows and batches used across tests."""

from metering.units import END_REASONS

BUCKET = 1_764_876_540  # 2025-12-04T19:29:00Z, a bucket start aligned to 60 s


def row(org_id="acme", bucket_start=BUCKET, compute_milli=80_000, connections=1, reason="client_disconnect", **extra):
    return {
        "org_id": org_id,
        "bucket_start": bucket_start,
        "bucket_seconds": 60,
        "compute_milli": compute_milli,
        "cpu_milli": compute_milli,
        "memory_milli": 2 * compute_milli,
        "connections": connections,
        "end_reasons": {reason: connections},
        **extra,
    }


def reason_counts(bucket_row):
    return {reason: getattr(bucket_row, f"ended_{reason}") for reason in END_REASONS}
