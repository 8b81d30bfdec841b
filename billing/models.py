"""The ledger: one append-only row per upstream attempt that can cost money.

Rows are never updated; a correction is a new row with kind=correction pointing at
the row it corrects. Costs are integer micro-USD (1 USD = 1_000_000).
"""

from __future__ import annotations

from django.db import models


class LedgerStatus(models.TextChoices):
    SUCCESS = "success"
    ERROR = "error"
    CLIENT_DISCONNECTED = "client_disconnected"
    # The upstream broke off mid-answer: what it generated is billed.
    PARTIAL = "partial"


class LedgerKind(models.TextChoices):
    CHARGE = "charge"
    CORRECTION = "correction"


class LedgerEntry(models.Model):
    # The gateway's request id (x-request-id) plus the attempt number: retries and
    # fallbacks of one request are separate rows, and writing the same attempt twice
    # is a no-op thanks to the unique constraint.
    request_id = models.CharField(max_length=64)
    attempt = models.PositiveSmallIntegerField(default=1)
    kind = models.CharField(max_length=16, choices=LedgerKind.choices, default=LedgerKind.CHARGE)
    corrects = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.PROTECT, related_name="corrections"
    )
    # Ids, not foreign keys: the ledger outlives deleted keys and deployments, and
    # billing does not reach into the gateway's tables.
    team_id = models.BigIntegerField()
    key_id = models.BigIntegerField(null=True)
    endpoint = models.CharField(max_length=32)
    model = models.CharField(max_length=200)
    deployment_id = models.CharField(max_length=64, blank=True, default="")
    provider = models.CharField(max_length=64, blank=True, default="")
    provider_model = models.CharField(max_length=300, blank=True, default="")
    prompt_tokens = models.BigIntegerField(default=0)
    completion_tokens = models.BigIntegerField(default=0)
    cached_read_tokens = models.BigIntegerField(default=0)
    cache_write_tokens = models.BigIntegerField(default=0)
    reasoning_tokens = models.BigIntegerField(default=0)
    # Usage was counted by the gateway because the provider reported none.
    usage_estimated = models.BooleanField(default=False)
    list_cost_micro_usd = models.BigIntegerField(default=0)
    charged_cost_micro_usd = models.BigIntegerField(default=0)
    status = models.CharField(max_length=24, choices=LedgerStatus.choices)
    http_status = models.PositiveSmallIntegerField(null=True)
    error_type = models.CharField(max_length=64, blank=True, default="")
    cache_hit = models.BooleanField(default=False)
    is_batch = models.BooleanField(default=False)
    stream = models.BooleanField(default=False)
    latency_ms = models.PositiveIntegerField(default=0)
    ttft_ms = models.PositiveIntegerField(null=True)
    started_at = models.DateTimeField()
    ended_at = models.DateTimeField()
    end_user = models.CharField(max_length=256, blank=True, default="")
    tags = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["request_id", "attempt"], name="ledger_request_attempt_unique"
            ),
        ]
        indexes = [
            models.Index(fields=["team_id", "started_at"]),
            models.Index(fields=["key_id", "started_at"]),
            models.Index(fields=["started_at"]),
            models.Index(fields=["model", "started_at"]),
        ]

    def __str__(self) -> str:
        return f"{self.request_id}#{self.attempt} {self.status} {self.charged_cost_micro_usd}µ$"


class BudgetAlert(models.Model):
    """A budget threshold crossed in a period: recorded once, delivered by the workers."""

    scope = models.CharField(max_length=8)  # "team" | "key"
    owner_id = models.BigIntegerField()
    team_id = models.BigIntegerField()
    period_id = models.CharField(max_length=32)
    threshold_percent = models.PositiveIntegerField()
    limit_micro_usd = models.BigIntegerField()
    spent_micro_usd = models.BigIntegerField()
    crossed_at = models.DateTimeField(auto_now_add=True)
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["scope", "owner_id", "period_id", "threshold_percent"],
                name="budget_alert_once_per_period",
            )
        ]
