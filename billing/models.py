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
            # The rollups' watermark and the usage pages' live tail select by insert time.
            models.Index(fields=["created_at"]),
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

    def __str__(self) -> str:
        return f"{self.scope} {self.owner_id} {self.period_id} {self.threshold_percent}%"


# --- Usage rollups ------------------------------------------------------------------------------


class Granularity(models.TextChoices):
    HOUR = "hour"
    DAY = "day"


class UsageRollup(models.Model):
    """Ledger sums per bucket (an hour or a UTC day) and team, key, model, deployment, tag.

    `tag=""` rows count every ledger row exactly once: team and key totals read those.
    A row tagged [a, b] also counts in a `tag="a"` and a `tag="b"` row, so per-tag rows
    overlap and must never be added up into a total. `key_id=0` stands for "no key".
    Each bucket holds exactly the ledger rows with `created_at` before the rollup's
    cutoff (RollupState.cutoff); rows created since are the live tail.
    """

    granularity = models.CharField(max_length=4, choices=Granularity.choices)
    bucket_start = models.DateTimeField()  # UTC
    team_id = models.BigIntegerField()
    key_id = models.BigIntegerField(default=0)
    model = models.CharField(max_length=200)
    deployment_id = models.CharField(max_length=64, blank=True, default="")
    tag = models.CharField(max_length=64, blank=True, default="")
    requests = models.BigIntegerField(default=0)
    errors = models.BigIntegerField(default=0)
    prompt_tokens = models.BigIntegerField(default=0)
    completion_tokens = models.BigIntegerField(default=0)
    cached_read_tokens = models.BigIntegerField(default=0)
    cache_write_tokens = models.BigIntegerField(default=0)
    reasoning_tokens = models.BigIntegerField(default=0)
    list_cost_micro_usd = models.BigIntegerField(default=0)
    charged_cost_micro_usd = models.BigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=[
                    "granularity",
                    "bucket_start",
                    "team_id",
                    "key_id",
                    "model",
                    "deployment_id",
                    "tag",
                ],
                name="usage_rollup_bucket_unique",
            )
        ]
        indexes = [
            models.Index(fields=["granularity", "team_id", "bucket_start"]),
            models.Index(fields=["granularity", "bucket_start"]),
        ]

    def __str__(self) -> str:
        return (
            f"{self.granularity} {self.bucket_start:%Y-%m-%dT%H} team {self.team_id} {self.model}"
        )


class RollupState(models.Model):
    """The one row that says how far the rollups have read the ledger."""

    singleton = models.BooleanField(default=True, unique=True)
    # Every bucket holds exactly the ledger rows created before this instant.
    cutoff = models.DateTimeField(null=True, blank=True)
    last_run_at = models.DateTimeField(null=True, blank=True)
    last_run_buckets = models.PositiveIntegerField(default=0)

    def __str__(self) -> str:
        return f"rollups up to {self.cutoff}"


class ReconciliationRun(models.Model):
    """One comparison of the rollups with the ledger: stored whether or not it matched."""

    window_start = models.DateTimeField()
    window_end = models.DateTimeField()
    cutoff = models.DateTimeField(null=True, blank=True)
    buckets_checked = models.PositiveIntegerField(default=0)
    ok = models.BooleanField()
    # [{"bucket_start", "team_id", "field", "rollup", "ledger"}], at most 100.
    differences = models.JSONField(default=list, blank=True)
    repaired = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    # --- Invoices ---------------------------------------------------------------------------------

    def __str__(self) -> str:
        return f"reconciliation {self.window_start}: {'ok' if self.ok else 'differences'}"


class InvoiceStatus(models.TextChoices):
    DRAFT = "draft"
    FINALIZED = "finalized"
    VOID = "void"


class InvoiceImmutable(Exception):
    """A finalized or void invoice (or its lines) may not change."""


class InvoiceNumberSequence(models.Model):
    """Gap-free invoice numbers: the row is locked and bumped in the finalizing transaction."""

    year = models.PositiveIntegerField(unique=True)
    last_number = models.PositiveIntegerField(default=0)

    def __str__(self) -> str:
        return f"{self.year}: {self.last_number}"


class Invoice(models.Model):
    """One team's bill for one calendar month in its timezone, across every provider.

    It covers the team's ledger rows with `started_at < period_end` and `created_at <
    ledger_cutoff` that no earlier finalized invoice covered (see billing.invoices);
    rows of earlier months that arrived late appear as adjustment lines. Money is
    integer micro-USD. Finalized invoices are immutable (save() here and a database
    trigger on Postgres); the only change left is finalized → void.
    """

    team_id = models.BigIntegerField()
    # Null while a draft: numbers are given at finalization, so they have no gaps.
    number = models.CharField(max_length=32, unique=True, null=True, blank=True)
    status = models.CharField(
        max_length=16, choices=InvoiceStatus.choices, default=InvoiceStatus.DRAFT
    )
    period_label = models.CharField(max_length=16)  # "2026-03"
    period_start = models.DateTimeField()  # UTC instants of the team's local month
    period_end = models.DateTimeField()
    timezone = models.CharField(max_length=64, default="UTC")
    currency = models.CharField(max_length=3, default="usd")
    # The team's name and markup when the invoice was last computed.
    team_name = models.CharField(max_length=200, blank=True, default="")
    markup_percent = models.DecimalField(max_digits=7, decimal_places=3, default=0)
    # What the covered rows cost at list prices, the markup (negative: discount),
    # and the total charged: total = subtotal + markup, to the micro-dollar.
    subtotal_micro_usd = models.BigIntegerField(default=0)
    markup_micro_usd = models.BigIntegerField(default=0)
    total_micro_usd = models.BigIntegerField(default=0)
    ledger_rows = models.BigIntegerField(default=0)
    # Covered: ledger rows created before this instant (see the class docstring).
    ledger_cutoff = models.DateTimeField()
    # The cutoff of the finalized invoice before this one (None: the first).
    previous_cutoff = models.DateTimeField(null=True, blank=True)
    previous_period_end = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    computed_at = models.DateTimeField()
    finalized_at = models.DateTimeField(null=True, blank=True)
    voided_at = models.DateTimeField(null=True, blank=True)
    void_reason = models.CharField(max_length=500, blank=True, default="")

    class Meta:
        ordering = ["-period_start", "-id"]
        constraints = [
            # One live invoice per team and month; a void one can be re-issued.
            models.UniqueConstraint(
                fields=["team_id", "period_start"],
                condition=~models.Q(status="void"),
                name="invoice_one_live_per_team_period",
            )
        ]
        indexes = [models.Index(fields=["team_id", "status", "period_start"])]

    def __str__(self) -> str:
        return self.number or f"draft {self.team_id} {self.period_label}"

    def save(self, *args: object, **kwargs: object) -> None:
        if self.pk is not None:
            stored = Invoice.objects.filter(pk=self.pk).values_list("status", flat=True).first()
            if stored is not None and stored != InvoiceStatus.DRAFT:
                update_fields = set(kwargs.get("update_fields") or ())  # type: ignore[call-overload]
                voiding = (
                    stored == InvoiceStatus.FINALIZED
                    and self.status == InvoiceStatus.VOID
                    and update_fields
                    and update_fields <= {"status", "voided_at", "void_reason"}
                )
                if not voiding:
                    raise InvoiceImmutable(
                        f"Invoice {self.number or self.pk} is {stored}; it can no longer change."
                    )
        super().save(*args, **kwargs)  # type: ignore[arg-type]

    def delete(self, *args: object, **kwargs: object) -> tuple[int, dict[str, int]]:
        if self.status != InvoiceStatus.DRAFT:
            raise InvoiceImmutable(f"Invoice {self.number} is {self.status}; it cannot be deleted.")
        return super().delete(*args, **kwargs)  # type: ignore[arg-type]


class InvoiceLineKind(models.TextChoices):
    USAGE = "usage"
    # Ledger rows of an earlier month that arrived after that month's invoice was finalized.
    ADJUSTMENT = "adjustment"


class InvoiceLine(models.Model):
    invoice = models.ForeignKey(Invoice, on_delete=models.CASCADE, related_name="lines")
    position = models.PositiveIntegerField()
    kind = models.CharField(max_length=16, choices=InvoiceLineKind.choices)
    # For adjustments: the month the usage belongs to ("2026-02").
    usage_period = models.CharField(max_length=16, blank=True, default="")
    provider = models.CharField(max_length=64, blank=True, default="")
    model = models.CharField(max_length=200)
    is_batch = models.BooleanField(default=False)
    description = models.CharField(max_length=500)
    requests = models.BigIntegerField(default=0)
    prompt_tokens = models.BigIntegerField(default=0)
    completion_tokens = models.BigIntegerField(default=0)
    cached_read_tokens = models.BigIntegerField(default=0)
    cache_write_tokens = models.BigIntegerField(default=0)
    reasoning_tokens = models.BigIntegerField(default=0)
    # Informational: USD per 1M tokens of each kind, as configured when computed.
    unit_prices = models.JSONField(default=dict, blank=True)
    list_amount_micro_usd = models.BigIntegerField(default=0)
    # The sum of the rows' charged costs: what the line adds to the total, exactly.
    amount_micro_usd = models.BigIntegerField(default=0)

    class Meta:
        ordering = ["invoice", "position"]
        constraints = [
            models.UniqueConstraint(fields=["invoice", "position"], name="invoice_line_position")
        ]

    def __str__(self) -> str:
        return f"{self.invoice_id}#{self.position} {self.description}"

    def save(self, *args: object, **kwargs: object) -> None:
        if not self._invoice_is_draft():
            raise InvoiceImmutable("The lines of a finalized or void invoice cannot change.")
        super().save(*args, **kwargs)  # type: ignore[arg-type]

    def delete(self, *args: object, **kwargs: object) -> tuple[int, dict[str, int]]:
        if not self._invoice_is_draft():
            raise InvoiceImmutable("The lines of a finalized or void invoice cannot change.")
        return super().delete(*args, **kwargs)  # type: ignore[arg-type]

    def _invoice_is_draft(self) -> bool:
        status = Invoice.objects.filter(pk=self.invoice_id).values_list("status", flat=True).first()
        return status in (None, InvoiceStatus.DRAFT)


# --- Notifications: team settings, webhooks, email outbox --------------------------------------


class TeamNotificationSettings(models.Model):
    """Where a team's budget alerts go by email (webhooks are WebhookEndpoint rows)."""

    team_id = models.BigIntegerField(unique=True)
    alert_emails = models.JSONField(default=list, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"team {self.team_id} alerts"


class WebhookEndpoint(models.Model):
    team_id = models.BigIntegerField(db_index=True)
    public_id = models.CharField(max_length=40, unique=True)  # "we_…"
    url = models.URLField(max_length=2000)
    description = models.CharField(max_length=500, blank=True, default="")
    # Event types delivered here; empty means every type.
    events = models.JSONField(default=list, blank=True)
    # Fernet token of the signing secret (core.crypto); shown once, at creation.
    secret_encrypted = models.TextField()
    secret_last4 = models.CharField(max_length=4)
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["team_id", "id"]

    def __str__(self) -> str:
        return f"{self.public_id} {self.url}"


class DeliveryStatus(models.TextChoices):
    PENDING = "pending"
    SENDING = "sending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # gave up after the last attempt


class WebhookDelivery(models.Model):
    """One event for one endpoint; retried with exponential backoff until delivered."""

    endpoint = models.ForeignKey(
        WebhookEndpoint, on_delete=models.CASCADE, related_name="deliveries"
    )
    team_id = models.BigIntegerField()
    event_id = models.CharField(max_length=64)  # "evt_…", the same for every endpoint
    event_type = models.CharField(max_length=64)
    # The exact JSON that is signed and sent.
    payload = models.TextField()
    status = models.CharField(
        max_length=16, choices=DeliveryStatus.choices, default=DeliveryStatus.PENDING
    )
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField()
    # While sending: the claim expires then (a worker died mid-request).
    claimed_until = models.DateTimeField(null=True, blank=True)
    last_status_code = models.PositiveIntegerField(null=True, blank=True)
    last_error = models.CharField(max_length=500, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["endpoint", "event_id"], name="webhook_delivery_once_per_endpoint"
            )
        ]
        indexes = [models.Index(fields=["status", "next_attempt_at"])]

    def __str__(self) -> str:
        return f"{self.event_id} to {self.endpoint_id} ({self.status})"


class WebhookAttempt(models.Model):
    delivery = models.ForeignKey(WebhookDelivery, on_delete=models.CASCADE, related_name="log")
    number = models.PositiveIntegerField()
    started_at = models.DateTimeField()
    duration_ms = models.PositiveIntegerField(default=0)
    status_code = models.PositiveIntegerField(null=True, blank=True)
    error = models.CharField(max_length=500, blank=True, default="")
    response_excerpt = models.CharField(max_length=500, blank=True, default="")

    class Meta:
        ordering = ["delivery", "number"]
        constraints = [
            models.UniqueConstraint(fields=["delivery", "number"], name="webhook_attempt_number")
        ]

    def __str__(self) -> str:
        return f"{self.delivery_id}#{self.number} {self.status_code or self.error}"


class EmailNotification(models.Model):
    """An outbox row: written with the event that causes it, sent (and retried) by a worker."""

    key = models.CharField(max_length=128, unique=True)  # what it is about, once
    team_id = models.BigIntegerField()
    recipients = models.JSONField(default=list)
    subject = models.CharField(max_length=300)
    body = models.TextField()
    status = models.CharField(
        max_length=16, choices=DeliveryStatus.choices, default=DeliveryStatus.PENDING
    )
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField()
    claimed_until = models.DateTimeField(null=True, blank=True)
    last_error = models.CharField(max_length=500, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["status", "next_attempt_at"])]

    def __str__(self) -> str:
        return f"{self.key} ({self.status})"


# --- Reconciliation with the providers' bills -------------------------------------------------


class ProviderCostImport(models.Model):
    """One provider export file imported: the same bytes are never applied twice."""

    provider = models.CharField(max_length=64)
    kind = models.CharField(max_length=16)  # "costs" | "usage": what the file held
    sha256 = models.CharField(max_length=64)
    filename = models.CharField(max_length=500, blank=True, default="")
    period = models.CharField(max_length=7, blank=True, default="")  # "2026-03", or "" for any
    first_day = models.DateField()
    last_day = models.DateField()
    rows = models.PositiveIntegerField(default=0)  # provider/model/day rows in the file
    imported_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-imported_at", "-id"]
        constraints = [
            models.UniqueConstraint(fields=["provider", "sha256"], name="provider_import_once")
        ]

    def __str__(self) -> str:
        return f"{self.provider} {self.kind} {self.first_day}..{self.last_day}"


class ProviderCost(models.Model):
    """What a provider says one of its models cost (and used) on one UTC day.

    Exact: USD as a Decimal, because providers bill below the micro-dollar (Anthropic
    reports fractional cents). Each day of an export states the whole day for that
    model, so importing a newer export of the same day replaces the figures rather
    than adding to them; that is also what makes a re-import a no-op.
    `cost_usd` is None until a costs export covered the day (a usage export only
    brings token counts), and the token counts are None until a usage export did.
    """

    provider = models.CharField(max_length=64)
    model = models.CharField(max_length=300)  # as the provider names it, e.g. "gpt-4o-mini"
    day = models.DateField()  # UTC
    cost_usd = models.DecimalField(max_digits=24, decimal_places=12, null=True, blank=True)
    input_tokens = models.BigIntegerField(null=True, blank=True)
    output_tokens = models.BigIntegerField(null=True, blank=True)
    source = models.ForeignKey(
        ProviderCostImport, null=True, on_delete=models.SET_NULL, related_name="costs"
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["provider", "day", "model"]
        constraints = [
            models.UniqueConstraint(
                fields=["provider", "model", "day"], name="provider_cost_once_per_model_day"
            )
        ]
        indexes = [models.Index(fields=["provider", "day"])]

    def __str__(self) -> str:
        return f"{self.provider} {self.model} {self.day}: {self.cost_usd}"


class DriftAlert(models.Model):
    """Our list cost and the provider's bill disagree on one model and day: recorded once.

    Delivered like a BudgetAlert (billing.notifications), by the same sweep, through
    the same email outbox.
    """

    provider = models.CharField(max_length=64)
    model = models.CharField(max_length=300)
    day = models.DateField()
    ledger_cost_micro_usd = models.BigIntegerField()
    provider_cost_usd = models.DecimalField(max_digits=24, decimal_places=12)
    drift_percent = models.DecimalField(max_digits=12, decimal_places=2)
    threshold_percent = models.DecimalField(max_digits=7, decimal_places=2)
    crossed_at = models.DateTimeField(auto_now_add=True)
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["provider", "model", "day"], name="drift_alert_once_per_model_day"
            )
        ]

    def __str__(self) -> str:
        return f"drift {self.provider} {self.model} {self.day}: {self.drift_percent}%"
