"""The delivered-event ledger, and the database lock used where Redis is not configured."""

from django.db import models


class DeliveredEvent(models.Model):
    """One event PostHog (or the local outbox) confirmed; written with the buffer row's delete."""

    event_uuid = models.UUIDField(primary_key=True)
    org_id = models.CharField(max_length=200, db_index=True)
    bucket_start = models.BigIntegerField(help_text="Bucket start, UTC epoch seconds")
    bucket_seconds = models.IntegerField()
    generation = models.IntegerField()
    compute_milli = models.BigIntegerField(help_text="Compute seconds x 1000")
    cpu_milli = models.BigIntegerField(help_text="Core seconds x 1000")
    memory_milli = models.BigIntegerField(help_text="GiB seconds x 1000")
    connections = models.BigIntegerField()
    end_reasons = models.JSONField()
    destination = models.CharField(max_length=300, help_text="PostHog host, or the outbox file")
    delivered_at = models.DateTimeField(db_index=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["org_id", "bucket_start", "generation"], name="one_delivery_per_org_bucket_generation"
            ),
        ]

    def __str__(self):
        return f"{self.org_id} @ {self.bucket_start} gen {self.generation}"


class DrainLease(models.Model):
    """The drain's singleton lock as a row with an expiry, for set-ups without Redis."""

    name = models.CharField(max_length=100, primary_key=True)
    holder = models.CharField(max_length=300, blank=True, default="")
    expires_at = models.DateTimeField()

    def __str__(self):
        return f"{self.name} held by {self.holder or 'nobody'} until {self.expires_at}"
