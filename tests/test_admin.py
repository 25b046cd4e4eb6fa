from datetime import datetime, timezone

import pytest
from django.contrib.auth.models import User

from billing_drain import services
from metering import buffer
from metering.models import UsageBucket
from tests.factories import BUCKET, row

CLOSED = datetime.fromtimestamp(BUCKET + 90, timezone.utc)
BUCKETS_URL = "/admin/metering/usagebucket/"


@pytest.fixture
def admin_client(client, db):
    user = User.objects.create_superuser("operator", "operator@example.com", "secret-password")
    client.force_login(user)
    return client


def test_bucket_list_shows_usage(admin_client):
    buffer.apply_batch("b1", [row(org_id="hooli", compute_milli=4657)])

    page = admin_client.get(BUCKETS_URL).content.decode()

    assert "hooli" in page
    assert "4.657" in page
    assert "2025-12-04 19:29:00" in page


def test_buckets_are_read_only(admin_client):
    buffer.apply_batch("b1", [row()])
    bucket = UsageBucket.objects.get()

    assert admin_client.get(f"{BUCKETS_URL}add/").status_code == 403
    assert admin_client.post(f"{BUCKETS_URL}{bucket.id}/change/", {"compute_milli": 1}).status_code == 403
    assert admin_client.post(f"{BUCKETS_URL}{bucket.id}/delete/", {"post": "yes"}).status_code == 403
    bucket.refresh_from_db()
    assert bucket.compute_milli == 80_000


def test_ship_now_action_reports_counts(admin_client, posthog_settings, capture_server, redis_client):
    buffer.apply_batch("b1", [row(org_id="acme"), row(org_id="globex")])
    ids = list(UsageBucket.objects.values_list("id", flat=True))

    response = admin_client.post(BUCKETS_URL, {"action": "ship_now", "_selected_action": ids}, follow=True)

    assert "Sealed 2, delivered 2, kept for retry 0, parked 0" in response.content.decode()
    assert len(capture_server.events()) == 2
    assert UsageBucket.objects.count() == 0


def test_retry_parked_action_reports_counts(admin_client, posthog_settings, capture_server):
    buffer.apply_batch("b1", [row(org_id="acme")])
    services.seal_closed_buckets(now=CLOSED)
    bucket = UsageBucket.objects.get()
    capture_server.poison(str(bucket.event_uuid))
    services.drain(now=CLOSED)
    assert UsageBucket.objects.get().state == "rejected"

    response = admin_client.post(BUCKETS_URL, {"action": "retry_parked", "_selected_action": [bucket.id]}, follow=True)

    assert "1 parked events will ship with the next drain." in response.content.decode()
    assert UsageBucket.objects.get().state == "sealed"


def test_delivered_ledger_lists_events(admin_client, posthog_settings, capture_server):
    buffer.apply_batch("b1", [row(org_id="initech", compute_milli=516_000)])
    services.drain(now=CLOSED)

    page = admin_client.get("/admin/billing_drain/deliveredevent/").content.decode()

    assert "initech" in page
    assert "516.000" in page
    assert admin_client.get("/admin/billing_drain/deliveredevent/add/").status_code == 403
