"""The usage buffer: one row per (org, bucket) while it is open, then sealed and shipped."""

from django.db import models
from django.db.models import Q

from metering.units import END_REASONS


class UsageBucket(models.Model):
    """Usage of one org in one time bucket, in integer thousandths.

    At most one row per (org, bucket_start) is open; increments go to it. The
    drain seals closed rows and gives each a generation and a deterministic
    event uuid. An increment that arrives after the seal creates a new open row
    for the same (org, bucket_start), shipped later under its own uuid. Rows are
    deleted once PostHog confirmed them (see DeliveredEvent).
    """

    class State(models.TextChoices):
        OPEN = "open"
        SEALED = "sealed"
        REJECTED = "rejected"

    org_id = models.CharField(max_length=200)
    bucket_start = models.BigIntegerField(help_text="Bucket start, UTC epoch seconds")
    bucket_seconds = models.IntegerField()
    state = models.CharField(max_length=10, choices=State.choices, default=State.OPEN)

    compute_milli = models.BigIntegerField(default=0, help_text="Compute seconds x 1000")
    cpu_milli = models.BigIntegerField(default=0, help_text="Core seconds x 1000")
    memory_milli = models.BigIntegerField(default=0, help_text="GiB seconds x 1000")
    connections = models.BigIntegerField(default=0)
    ended_client_disconnect = models.BigIntegerField(default=0)
    ended_idle_reap = models.BigIntegerField(default=0)
    ended_user_error = models.BigIntegerField(default=0)
    ended_fatal_error = models.BigIntegerField(default=0)
    ended_shutdown = models.BigIntegerField(default=0)
    ended_other = models.BigIntegerField(default=0)

    created_at = models.DateTimeField()
    sealed_at = models.DateTimeField(null=True, blank=True)
    generation = models.IntegerField(null=True, blank=True)
    event_uuid = models.UUIDField(null=True, blank=True, unique=True)
    attempts = models.IntegerField(default=0)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True, default="")

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["org_id", "bucket_start"],
                condition=Q(state="open"),
                name="one_open_row_per_org_bucket",
            ),
            models.UniqueConstraint(
                fields=["org_id", "bucket_start", "generation"],
                condition=Q(generation__isnull=False),
                name="one_row_per_org_bucket_generation",
            ),
        ]
        indexes = [models.Index(fields=["state", "bucket_start"], name="usage_state_bucket_idx")]

    def __str__(self):
        return f"{self.org_id} @ {self.bucket_start} ({self.state})"

    def end_reasons(self):
        return {reason: getattr(self, f"ended_{reason}") for reason in END_REASONS}


REASON_COLUMNS = tuple(f"ended_{reason}" for reason in END_REASONS)


class AppliedMessage(models.Model):
    """A message id (batch or connection) already applied to the buffer.

    Written in the same transaction as its increments, so a redelivered message
    finds its id here and is skipped.
    """

    key = models.CharField(max_length=255, primary_key=True)
    applied_at = models.DateTimeField(db_index=True)

    def __str__(self):
        return self.key
