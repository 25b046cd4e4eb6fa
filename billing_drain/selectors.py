"""Read-only queries over the buffer and the delivered ledger."""

from django.db.models import Count, Sum

from billing_drain.models import DeliveredEvent
from metering.models import UsageBucket


def delivered_totals(org_ids, first_bucket, last_bucket):
    """Return {org: (events, connections, compute_milli)} delivered for buckets in [first, last]."""
    rows = (
        DeliveredEvent.objects.filter(org_id__in=org_ids, bucket_start__gte=first_bucket, bucket_start__lte=last_bucket)
        .values_list("org_id")
        .annotate(events=Count("event_uuid"), connections=Sum("connections"), compute=Sum("compute_milli"))
    )
    return {org: (events, connections, compute) for org, events, connections, compute in rows}


def delivery_destinations(org_ids, first_bucket, last_bucket):
    return sorted(
        set(
            DeliveredEvent.objects.filter(
                org_id__in=org_ids, bucket_start__gte=first_bucket, bucket_start__lte=last_bucket
            ).values_list("destination", flat=True)
        )
    )


def undelivered_counts(org_ids, first_bucket, last_bucket):
    """Return {state: rows} still in the buffer for those orgs and buckets."""
    rows = (
        UsageBucket.objects.filter(org_id__in=org_ids, bucket_start__gte=first_bucket, bucket_start__lte=last_bucket)
        .values_list("state")
        .annotate(rows=Count("id"))
    )
    return dict(rows)
