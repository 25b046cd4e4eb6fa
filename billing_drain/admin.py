"""Read-only admin for the delivered-event ledger."""

from datetime import datetime, timezone

from django.contrib import admin

from billing_drain.models import DeliveredEvent
from metering.admin import ReadOnlyAdmin
from metering.units import milli_to_decimal


@admin.register(DeliveredEvent)
class DeliveredEventAdmin(ReadOnlyAdmin):
    list_display = (
        "org_id",
        "bucket_start_utc",
        "generation",
        "compute_seconds",
        "connections",
        "destination",
        "delivered_at",
        "event_uuid",
    )
    list_filter = ("destination",)
    search_fields = ("org_id", "event_uuid")
    ordering = ("-delivered_at",)
    date_hierarchy = "delivered_at"

    @admin.display(description="bucket start (UTC)", ordering="bucket_start")
    def bucket_start_utc(self, event):
        return datetime.fromtimestamp(event.bucket_start, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")

    @admin.display(description="compute seconds", ordering="compute_milli")
    def compute_seconds(self, event):
        return milli_to_decimal(event.compute_milli)
