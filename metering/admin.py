"""Read-only admin for the usage buffer: nobody edits a bill by hand."""

from datetime import datetime, timezone

from django.contrib import admin, messages
from django.utils import timezone as django_timezone

from metering.models import UsageBucket
from metering.units import milli_to_decimal


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(UsageBucket)
class UsageBucketAdmin(ReadOnlyAdmin):
    list_display = (
        "org_id",
        "bucket_start_utc",
        "compute_seconds",
        "connections",
        "state",
        "age",
        "attempts",
        "last_error",
    )
    list_filter = ("state", "bucket_seconds")
    search_fields = ("org_id", "event_uuid")
    ordering = ("-bucket_start", "org_id")
    actions = ("ship_now", "retry_parked")

    @admin.display(description="bucket start (UTC)", ordering="bucket_start")
    def bucket_start_utc(self, row):
        return datetime.fromtimestamp(row.bucket_start, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")

    @admin.display(description="compute seconds", ordering="compute_milli")
    def compute_seconds(self, row):
        return milli_to_decimal(row.compute_milli)

    @admin.display(description="age", ordering="created_at")
    def age(self, row):
        seconds = int((django_timezone.now() - row.created_at).total_seconds())
        return f"{seconds // 3600}h {seconds % 3600 // 60}m {seconds % 60}s"

    @admin.action(description="Ship selected buckets now")
    def ship_now(self, request, queryset):
        from billing_drain.services import DrainLockHeld, ship_now

        try:
            report = ship_now(list(queryset.values_list("id", flat=True)))
        except DrainLockHeld as held:
            self.message_user(request, f"Nothing shipped: {held}. Try again shortly.", messages.WARNING)
            return
        level = messages.SUCCESS if report.succeeded else messages.ERROR
        self.message_user(
            request,
            f"Sealed {report.sealed}, delivered {report.delivered_events}, kept for retry "
            f"{report.kept_for_retry}, parked {report.parked} (destination {report.destination}).",
            level,
        )

    @admin.action(description="Retry selected parked (rejected) events")
    def retry_parked(self, request, queryset):
        from billing_drain.services import retry_parked

        count = retry_parked(list(queryset.values_list("id", flat=True)))
        self.message_user(request, f"{count} parked events will ship with the next drain.", messages.SUCCESS)
