"""Expected and billed totals for the chaos harness, computed independently of metering.units.

Expected totals come from the workload the harness generated and from the
ledgers that control-plane processes wrote before each record call. Billed
totals come from the capture server's events file, folded by uuid as PostHog
folds a re-sent event. Both are integer thousandths of compute seconds.
"""

from __future__ import annotations

import collections
import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
MEMORY_PER_CORE_GIB = Fraction(2)

# (cores as sent, memory as sent, cores, memory in GiB). The values are written
# out by hand here, not parsed with metering.units.
SIZES = (
    ("8", "16Gi", Fraction(8), Fraction(16)),
    ("500m", "3Gi", Fraction(1, 2), Fraction(3)),
    ("2", "4Gi", Fraction(2), Fraction(4)),
    ("1.5", "1536Mi", Fraction(3, 2), Fraction(3, 2)),
    ("4", "16G", Fraction(4), Fraction(16 * 10**9, 2**30)),
    (0.25, "17179869184", Fraction(1, 4), Fraction(16)),
    ("250m", "8Gi", Fraction(1, 4), Fraction(8)),
)


def expected_compute_milli(size_index, duration_ms):
    """Return one connection's compute seconds in thousandths: max(cores, GiB / 2) per started second, half up."""
    _, _, cores, memory_gib = SIZES[size_index]
    billed_seconds = max(1, -(-duration_ms // 1000))
    exact = max(cores, memory_gib / MEMORY_PER_CORE_GIB) * billed_seconds * 1000
    return math.floor(exact + Fraction(1, 2))


def epoch_seconds(moment):
    """Return whole epoch seconds of an aware datetime, rounded down, without float arithmetic."""
    delta = moment - EPOCH
    return delta.days * 86400 + delta.seconds


def bucket_of(seconds, bucket_seconds):
    return seconds // bucket_seconds * bucket_seconds


class BucketGroups:
    """Union-find over (org, bucket): a connection whose end straddles two buckets joins them."""

    def __init__(self):
        self._parent = {}

    def find(self, key):
        self._parent.setdefault(key, key)
        while self._parent[key] != key:
            self._parent[key] = self._parent[self._parent[key]]
            key = self._parent[key]
        return key

    def join(self, first, second):
        self._parent[self.find(first)] = self.find(second)


@dataclass
class Expected:
    """Expected billing per (org, bucket), and what SIGKILLed control-plane processes may have lost."""

    bucket_seconds: int
    compute: collections.Counter = field(default_factory=collections.Counter)
    connections: collections.Counter = field(default_factory=collections.Counter)
    at_risk_compute: collections.Counter = field(default_factory=collections.Counter)
    at_risk_connections: collections.Counter = field(default_factory=collections.Counter)
    groups: BucketGroups = field(default_factory=BucketGroups)
    recorded: int = 0
    invalid: int = 0
    at_risk: int = 0

    def add(self, org, buckets, milli, at_risk=False):
        """Add one billable connection that ended in one of ``buckets`` (two when its end time is uncertain)."""
        key = (org, buckets[0])
        for other in buckets[1:]:
            self.groups.join(key, (org, other))
        self.compute[key] += milli
        self.connections[key] += 1
        self.recorded += 1
        if at_risk:
            self.at_risk_compute[key] += milli
            self.at_risk_connections[key] += 1
            self.at_risk += 1


def ledger_buckets(entry, bucket_seconds):
    """Return the bucket, or the two buckets, that a ledger entry's connection may have ended in."""
    if "end" in entry:
        return [bucket_of(epoch_seconds(datetime.fromisoformat(entry["end"])), bucket_seconds)]
    if "epoch" in entry:
        return [bucket_of(int(float(entry["epoch"])), bucket_seconds)]
    # The client stamped time.time() during the call, between these two readings.
    before = entry["before"]
    after = entry.get("returned", before + 1.0)
    return sorted({bucket_of(int(before), bucket_seconds), bucket_of(int(after), bucket_seconds)})


def read_ledger(path):
    """Return (entries by id, ids in ledger order, position of the first id after the last checkpoint)."""
    entries = {}
    order = []
    checkpoint = 0
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return entries, order, 0
    complete, _, _ = raw.rpartition(b"\n")
    for line in complete.split(b"\n"):
        if not line.strip():
            continue
        item = json.loads(line)
        if "checkpoint" in item:
            checkpoint = len(order)
            continue
        if item["id"] in entries:
            entries[item["id"]].update(item)
        else:
            entries[item["id"]] = item
            order.append(item["id"])
    return entries, order, checkpoint


def add_ledger(expected, specs, path, killed):
    """Add one control-plane instance's ledger. With ``killed``, the specs after its last checkpoint are at risk."""
    entries, order, checkpoint = read_ledger(path)
    for position, spec_id in enumerate(order):
        spec = specs[spec_id]
        entry = entries[spec_id]
        buckets = ledger_buckets(entry, expected.bucket_seconds)
        if not spec["valid"]:
            expected.invalid += 1
            continue
        at_risk = killed and position >= checkpoint
        expected.add(spec["org"], buckets, expected_compute_milli(spec["size"], spec["ms"]), at_risk)
    return len(order)


@dataclass
class Billed:
    compute: collections.Counter
    connections: collections.Counter
    events: int
    deliveries: int
    conflicting_uuids: set
    inexact_numbers: list
    by_uuid: dict


def read_billed(events_file):
    """Fold the capture server's accepted events by uuid and sum them per (org, bucket start)."""
    from tests.capture_server import read_jsonl

    latest = {}
    conflicting = set()
    deliveries = 0
    for event in read_jsonl(events_file):
        deliveries += 1
        key = str(event["uuid"]).lower()
        previous = latest.get(key)
        if previous is not None and _canonical(previous) != _canonical(event):
            conflicting.add(key)
        latest[key] = event
    compute = collections.Counter()
    connections = collections.Counter()
    inexact = []
    for key, event in latest.items():
        properties = event["properties"]
        bucket = epoch_seconds(datetime.fromisoformat(properties["bucket_start"]))
        org = event["distinct_id"]
        compute[(org, bucket)] += properties["compute_milli"]
        connections[(org, bucket)] += properties["connections"]
        if Fraction(str(properties["compute_seconds"])) * 1000 != properties["compute_milli"]:
            inexact.append(key)
    return Billed(compute, connections, len(latest), deliveries, conflicting, inexact, latest)


def _canonical(event):
    return json.dumps(event, sort_keys=True, separators=(",", ":"))


@dataclass
class Comparison:
    expected: int = 0
    billed: int = 0
    over: int = 0
    lost: int = 0
    accepted: int = 0
    over_keys: list = field(default_factory=list)
    lost_keys: list = field(default_factory=list)


def compare(expected_totals, at_risk_totals, billed_totals, groups):
    """Compare per bucket group: over-billing, loss beyond what killed processes recorded, and accepted loss."""
    result = Comparison()
    grouped = collections.defaultdict(lambda: [0, 0, 0])
    for index, totals in enumerate((expected_totals, at_risk_totals, billed_totals)):
        for key, value in totals.items():
            grouped[groups.find(key)][index] += value
    for key, (expected, at_risk, billed) in sorted(grouped.items()):
        result.expected += expected
        result.billed += billed
        if billed > expected:
            result.over += billed - expected
            result.over_keys.append((key, expected, billed))
            continue
        missing = expected - billed
        accepted = min(missing, at_risk)
        result.accepted += accepted
        if missing > accepted:
            result.lost += missing - accepted
            result.lost_keys.append((key, expected, billed, at_risk))
    return result
