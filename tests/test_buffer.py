from datetime import datetime, timezone

import pytest

from billing_drain.services import seal_closed_buckets
from metering import buffer
from metering.models import AppliedMessage, UsageBucket
from tests.factories import BUCKET, row

AFTER_BUCKET_CLOSED = datetime.fromtimestamp(BUCKET + 60 + 30, timezone.utc)

pytestmark = pytest.mark.django_db


def open_rows(org_id="acme"):
    return list(UsageBucket.objects.filter(org_id=org_id, state=UsageBucket.State.OPEN))


def test_batch_creates_one_open_row_per_org_bucket():
    buffer.apply_batch("b1", [row(compute_milli=1000), row(org_id="globex", compute_milli=5)])
    buffer.apply_batch("b2", [row(compute_milli=2500, connections=2)])

    acme = open_rows()
    assert len(acme) == 1
    assert acme[0].compute_milli == 3500
    assert acme[0].connections == 3
    assert acme[0].ended_client_disconnect == 3
    assert open_rows("globex")[0].compute_milli == 5


def test_redelivered_batch_is_counted_once():
    assert buffer.apply_batch("same-id", [row(compute_milli=1000)]) == 1
    assert buffer.apply_batch("same-id", [row(compute_milli=1000)]) == 0

    assert open_rows()[0].compute_milli == 1000
    assert AppliedMessage.objects.filter(key="batch:same-id").count() == 1


def test_connection_id_applies_once_across_batches():
    buffer.apply_batch("b1", [row(compute_milli=700, connection_id="pg:1")])
    buffer.apply_batch("b2", [row(compute_milli=700, connection_id="pg:1"), row(compute_milli=300, connection_id="pg:2")])

    assert open_rows()[0].compute_milli == 1000
    assert open_rows()[0].connections == 2


def test_connection_id_repeated_in_one_batch_applies_once():
    buffer.apply_batch("b1", [row(compute_milli=700, connection_id="pg:1"), row(compute_milli=700, connection_id="pg:1")])

    assert open_rows()[0].compute_milli == 700


def test_increment_is_one_upsert(django_assert_num_queries):
    rows = [row(org_id=f"org-{index}", compute_milli=index) for index in range(50)]
    # SAVEPOINT, claim the batch id, one multi-row upsert, RELEASE SAVEPOINT.
    with django_assert_num_queries(4):
        buffer.apply_batch("b1", rows)


def test_malformed_batch_writes_nothing():
    good = row(compute_milli=1000)
    bad = row(compute_milli=-5)

    with pytest.raises(buffer.InvalidMessage, match="row 1 has invalid compute_milli -5"):
        buffer.apply_batch("b1", [good, bad])

    assert UsageBucket.objects.count() == 0
    assert AppliedMessage.objects.count() == 0


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        pytest.param("not a list", "expected a list", id="rows-not-list"),
        pytest.param([42], "row 0 is int", id="row-not-object"),
        pytest.param([row(org_id="")], "invalid org_id ''", id="empty-org"),
        pytest.param([row(bucket_seconds=0)], "bucket_seconds 0", id="zero-width"),
        pytest.param([row(end_reasons={"teleported": 1})], "unknown end reason 'teleported'", id="unknown-reason"),
        pytest.param([row(connections="3")], "invalid connections '3'", id="string-count"),
    ],
)
def test_malformed_rows_are_rejected(rows, message):
    with pytest.raises(buffer.InvalidMessage, match=message):
        buffer.apply_batch("b1", rows)


def test_increment_after_seal_goes_to_a_new_row():
    buffer.apply_batch("b1", [row(compute_milli=1000)])
    assert seal_closed_buckets(now=AFTER_BUCKET_CLOSED) == 1

    buffer.apply_batch("b2", [row(compute_milli=250)])

    sealed = UsageBucket.objects.get(state=UsageBucket.State.SEALED)
    late = UsageBucket.objects.get(state=UsageBucket.State.OPEN)
    assert sealed.compute_milli == 1000
    assert late.compute_milli == 250
    assert seal_closed_buckets(now=AFTER_BUCKET_CLOSED) == 1
    late.refresh_from_db()
    assert (sealed.generation, late.generation) == (1, 2)
    assert sealed.event_uuid != late.event_uuid


def test_seal_waits_for_grace_period():
    buffer.apply_batch("b1", [row()])

    assert seal_closed_buckets(now=datetime.fromtimestamp(BUCKET + 60 + 29, timezone.utc)) == 0
    assert seal_closed_buckets(now=datetime.fromtimestamp(BUCKET + 60 + 30, timezone.utc)) == 1
