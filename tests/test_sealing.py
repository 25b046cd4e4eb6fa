from datetime import datetime, timezone

import pytest
from django.db import connection

from billing_drain import sealing
from billing_drain.events import event_uuid
from billing_drain.models import DeliveredEvent
from metering import buffer
from metering.models import UsageBucket
from tests.factories import BUCKET, row

CLOSED = datetime.fromtimestamp(BUCKET + 90, timezone.utc)
NEXT_BUCKET = BUCKET + 60

pytestmark = pytest.mark.django_db
requires_row_locks = pytest.mark.skipif(
    connection.vendor != "postgresql", reason="SQLite locks whole tables, so an increment cannot lock one row"
)


def delivered(org_id, bucket_start, generation):
    DeliveredEvent.objects.create(
        event_uuid=event_uuid(org_id, bucket_start, generation),
        org_id=org_id,
        bucket_start=bucket_start,
        bucket_seconds=60,
        generation=generation,
        compute_milli=1,
        cpu_milli=1,
        memory_milli=1,
        connections=1,
        end_reasons={},
        destination="test",
        delivered_at=CLOSED,
    )


def earlier_row(org_id, bucket_start, generation, state):
    UsageBucket.objects.create(
        org_id=org_id,
        bucket_start=bucket_start,
        bucket_seconds=60,
        state=state,
        created_at=CLOSED,
        generation=generation,
        event_uuid=event_uuid(org_id, bucket_start, generation),
    )


def open_row(org_id, bucket_start=BUCKET):
    buffer.apply_batch(f"open-{org_id}-{bucket_start}", [row(org_id=org_id, bucket_start=bucket_start)])
    return UsageBucket.objects.get(org_id=org_id, bucket_start=bucket_start, state=UsageBucket.State.OPEN)


def test_generation_follows_buffer_and_ledger():
    # Earlier generations are in the ledger, in the buffer, or only under another bucket or org.
    delivered("ledger-higher", BUCKET, 2)
    earlier_row("ledger-higher", BUCKET, 1, UsageBucket.State.SEALED)
    delivered("buffer-higher", BUCKET, 2)
    earlier_row("buffer-higher", BUCKET, 4, UsageBucket.State.REJECTED)
    delivered("other-bucket", BUCKET - 60, 7)
    earlier_row("other-bucket", BUCKET - 60, 8, UsageBucket.State.SEALED)
    delivered("other-org", BUCKET, 5)
    expected = {"ledger-higher": 3, "buffer-higher": 5, "other-bucket": 1, "first": 1}
    ids = {org: open_row(org).id for org in expected}

    assert sealing.seal_closed_buckets(now=CLOSED) == 4

    for org, generation in expected.items():
        sealed = UsageBucket.objects.get(id=ids[org])
        assert sealed.state == UsageBucket.State.SEALED, org
        assert sealed.generation == generation, org
        assert sealed.event_uuid == event_uuid(org, BUCKET, generation), org
        assert sealed.sealed_at == CLOSED, org


def test_open_bucket_is_not_sealed():
    open_row("still-open", NEXT_BUCKET)

    assert sealing.seal_closed_buckets(now=CLOSED) == 0

    assert UsageBucket.objects.get().state == UsageBucket.State.OPEN
    assert UsageBucket.objects.get().generation is None


def test_org_filter_seals_only_that_org():
    open_row("wanted")
    open_row("other")

    assert sealing.seal_closed_buckets(now=CLOSED, org_id="wanted") == 1

    assert UsageBucket.objects.get(org_id="wanted").state == UsageBucket.State.SEALED
    assert UsageBucket.objects.get(org_id="other").state == UsageBucket.State.OPEN


def test_row_ids_seal_open_buckets_too():
    chosen = open_row("chosen", NEXT_BUCKET)
    open_row("not-chosen", NEXT_BUCKET)

    assert sealing.seal_closed_buckets(now=CLOSED, row_ids=[chosen.id]) == 1

    chosen.refresh_from_db()
    assert chosen.state == UsageBucket.State.SEALED
    assert chosen.generation == 1
    assert UsageBucket.objects.get(org_id="not-chosen").state == UsageBucket.State.OPEN


def test_chunks_seal_every_row_once(monkeypatch):
    monkeypatch.setattr(sealing, "SEAL_CHUNK_ROWS", 2)
    for index in range(5):
        open_row(f"org-{index}")

    assert sealing.seal_closed_buckets(now=CLOSED) == 5

    sealed = UsageBucket.objects.filter(state=UsageBucket.State.SEALED)
    assert sealed.count() == 5
    assert {bucket.generation for bucket in sealed} == {1}
    assert {bucket.event_uuid for bucket in sealed} == {event_uuid(f"org-{index}", BUCKET, 1) for index in range(5)}


@requires_row_locks
@pytest.mark.django_db(transaction=True)
def test_row_locked_by_increment_is_skipped(lock_row):
    locked = open_row("locked")
    open_row("free")
    row_lock = lock_row(locked.id)

    assert sealing.seal_closed_buckets(now=CLOSED) == 1
    row_lock.release()

    assert UsageBucket.objects.get(org_id="locked").state == UsageBucket.State.OPEN
    assert UsageBucket.objects.get(org_id="free").state == UsageBucket.State.SEALED
    assert sealing.seal_closed_buckets(now=CLOSED) == 1
