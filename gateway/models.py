"""Tables owned by the data plane: teams, virtual keys and model deployments.

Money limits are stored as integer micro-USD (1 USD = 1_000_000), never floats.
"""

from __future__ import annotations

import uuid

from django.core.exceptions import ValidationError
from django.db import models

from gateway.destinations import api_base_problem


class RoutingStrategy(models.TextChoices):
    SIMPLE_SHUFFLE = "simple-shuffle"
    LEAST_BUSY = "least-busy"
    LATENCY_BASED = "latency-based-routing"
    COST_BASED = "cost-based-routing"


class ModelDeployment(models.Model):
    """One way to serve a public model name: a provider model behind an api_base.

    Several deployments may share a public `name`; the router balances between them.
    Prices are USD per 1M tokens; when left empty, litellm's bundled price map for
    `provider_model` applies.
    """

    public_id = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    name = models.CharField(max_length=200, db_index=True)
    provider_model = models.CharField(max_length=300)
    api_base = models.CharField(max_length=500, blank=True, default="")
    # Fernet token of the provider api key (see core.crypto); never shown again.
    api_key_encrypted = models.TextField(blank=True, default="")
    api_version = models.CharField(max_length=64, blank=True, default="")
    input_cost_per_million = models.DecimalField(
        max_digits=14, decimal_places=6, null=True, blank=True
    )
    output_cost_per_million = models.DecimalField(
        max_digits=14, decimal_places=6, null=True, blank=True
    )
    cached_input_cost_per_million = models.DecimalField(
        max_digits=14, decimal_places=6, null=True, blank=True
    )
    cache_write_cost_per_million = models.DecimalField(
        max_digits=14, decimal_places=6, null=True, blank=True
    )
    reasoning_cost_per_million = models.DecimalField(
        max_digits=14, decimal_places=6, null=True, blank=True
    )
    context_length = models.PositiveIntegerField(null=True, blank=True)
    max_output_tokens = models.PositiveIntegerField(null=True, blank=True)
    rpm_limit = models.PositiveIntegerField(null=True, blank=True)
    tpm_limit = models.PositiveBigIntegerField(null=True, blank=True)
    weight = models.PositiveIntegerField(default=1)
    priority = models.PositiveIntegerField(null=True, blank=True)
    timeout_seconds = models.FloatField(null=True, blank=True)
    # Per-model parameter policy: drop parameters the provider does not support
    # instead of refusing them with a 400. Off by default: nothing is dropped silently.
    drop_unsupported_params = models.BooleanField(default=False)
    # Capability overrides (function_calling, vision, streaming, structured_output).
    capabilities = models.JSONField(default=dict, blank=True)
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name", "id"]

    def __str__(self) -> str:
        return f"{self.name} -> {self.provider_model}"

    def clean(self) -> None:
        # The one api_base rule, for the admin API, the dashboard and commands alike.
        problem = api_base_problem(self.api_base)
        if problem:
            raise ValidationError({"api_base": problem})


class ConfigVersion(models.Model):
    """A single row whose token changes on every routing-configuration change.

    Each process compares it with the token its router was built from, and rebuilds
    when they differ. A random token (not a counter) stays unambiguous even if the
    table is emptied and refilled.
    """

    singleton = models.BooleanField(default=True, unique=True)
    token = models.CharField(max_length=32)
    changed_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return self.token


class ModelGroup(models.Model):
    """Routing policy for one public model name (all its deployments).

    Without a row, a model uses the defaults below: weighted shuffle, no fallbacks.
    """

    name = models.CharField(max_length=200, unique=True)
    routing_strategy = models.CharField(
        max_length=32, choices=RoutingStrategy.choices, default=RoutingStrategy.SIMPLE_SHUFFLE
    )
    # Ordered public model names tried when this one fails with a retryable error.
    fallbacks = models.JSONField(default=list, blank=True)
    # Tried instead when the prompt is too long for this model.
    context_window_fallbacks = models.JSONField(default=list, blank=True)
    # Tried instead when the provider refuses the content on policy grounds.
    content_policy_fallbacks = models.JSONField(default=list, blank=True)
    num_retries = models.PositiveSmallIntegerField(default=2)
    # First backoff; doubles per retry, with jitter.
    retry_backoff_seconds = models.FloatField(default=0.5)
    # A provider asking to wait longer than this (Retry-After) is skipped for the
    # next model instead of making the client wait.
    max_retry_after_seconds = models.FloatField(default=10.0)
    # Failures in a row that open a deployment's circuit, and for how long.
    allowed_fails = models.PositiveSmallIntegerField(default=3)
    cooldown_seconds = models.FloatField(default=10.0)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class ModelAlias(models.Model):
    """Another public name for a model, e.g. 'gpt-4' served by a Claude model group."""

    alias = models.CharField(max_length=200, unique=True)
    target = models.CharField(max_length=200)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["alias"]

    def __str__(self) -> str:
        return f"{self.alias} -> {self.target}"


# --- Files and batches (OpenAI's Files and Batch APIs) -----------------------------------------


class FilePurpose(models.TextChoices):
    BATCH = "batch"
    BATCH_OUTPUT = "batch_output"


class StoredFile(models.Model):
    """A file uploaded through /v1/files, or a batch's output or error file.

    The bytes live on the `gateway_files` storage backend under `storage_name`; the
    row says whose they are. Team and key are ids, not foreign keys, as in the ledger:
    a file outlives the key that uploaded it.
    """

    public_id = models.CharField(max_length=40, unique=True)  # "file-…"
    team_id = models.BigIntegerField()
    key_id = models.BigIntegerField(null=True, blank=True)
    # The dashboard user owning that key when the file was made: their other keys see it.
    owner_id = models.BigIntegerField(null=True, blank=True)
    purpose = models.CharField(max_length=32, choices=FilePurpose.choices)
    filename = models.CharField(max_length=255)
    bytes = models.BigIntegerField()
    storage_name = models.CharField(max_length=500)
    created_at = models.DateTimeField(auto_now_add=True)
    deleted_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["team_id", "created_at"])]

    def __str__(self) -> str:
        return self.public_id


class BatchStatus(models.TextChoices):
    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


class Batch(models.Model):
    public_id = models.CharField(max_length=40, unique=True)  # "batch_…"
    team_id = models.BigIntegerField()
    key_id = models.BigIntegerField()
    # The dashboard user owning that key when the batch was created (see StoredFile).
    owner_id = models.BigIntegerField(null=True, blank=True)
    endpoint = models.CharField(max_length=64)  # "/v1/chat/completions"
    completion_window = models.CharField(max_length=8, default="24h")
    input_file = models.ForeignKey(StoredFile, on_delete=models.PROTECT, related_name="+")
    output_file = models.ForeignKey(
        StoredFile, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    error_file = models.ForeignKey(
        StoredFile, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    status = models.CharField(max_length=16, choices=BatchStatus.choices)
    # OpenAI's `errors.data`: validation problems, each {code, message, param, line}.
    errors = models.JSONField(null=True, blank=True)
    metadata = models.JSONField(null=True, blank=True)
    total = models.PositiveIntegerField(default=0)
    completed = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    in_progress_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField()
    finalizing_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    failed_at = models.DateTimeField(null=True, blank=True)
    expired_at = models.DateTimeField(null=True, blank=True)
    cancelling_at = models.DateTimeField(null=True, blank=True)
    cancelled_at = models.DateTimeField(null=True, blank=True)
    # Touched by the worker running the batch; a stale one means it died.
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    # Native batches (sent to the provider's own batch API; see gateway.native_batches).
    # Empty for a batch whose lines run live. Moves forward only, by compare-and-set,
    # and every provider id is stored before the next step starts, so a worker killed
    # at any point resumes without a second provider batch.
    native_state = models.CharField(max_length=16, blank=True, default="")
    native_provider = models.CharField(max_length=16, blank=True, default="")
    # The deployment's public id (a string, as in the ledger).
    native_deployment_id = models.CharField(max_length=64, blank=True, default="")
    provider_file_id = models.CharField(max_length=128, blank=True, default="")
    provider_batch_id = models.CharField(max_length=128, blank=True, default="")
    provider_status = models.CharField(max_length=32, blank=True, default="")
    # The budget reservation made before submitting: {"id", "amount", "budget_keys"}.
    native_reservation = models.JSONField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["team_id", "id"]),
            models.Index(fields=["status", "heartbeat_at"]),
        ]

    def __str__(self) -> str:
        return f"{self.public_id} ({self.status})"


class NativeState(models.TextChoices):
    UPLOADING = "uploading"  # reserving, uploading the input, creating the provider batch
    SUBMITTED = "submitted"  # the provider batch exists; beat polls it
    DOWNLOADING = "downloading"  # it ended; results are being billed and stored
    DONE = "done"


class BatchLineStatus(models.TextChoices):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


class BatchLine(models.Model):
    """One request of a batch, and its result. Claimed by compare-and-set with a lease."""

    batch = models.ForeignKey(Batch, on_delete=models.CASCADE, related_name="lines")
    line_no = models.PositiveIntegerField()  # 1-based line of the input file
    custom_id = models.CharField(max_length=512)
    body = models.JSONField()
    # The ledger's request id for this line, derived from (batch, custom_id): a line run
    # twice after a crash is billed once.
    request_id = models.CharField(max_length=64)
    status = models.CharField(
        max_length=16, choices=BatchLineStatus.choices, default=BatchLineStatus.PENDING
    )
    claim_token = models.CharField(max_length=32, blank=True, default="")
    lease_until = models.DateTimeField(null=True, blank=True)
    # A line put back after a rate limit waits until then.
    not_before = models.DateTimeField(null=True, blank=True)
    tries = models.PositiveIntegerField(default=0)
    # Claims that lapsed while running this line (its worker died); bounded, so a
    # line that kills every worker that runs it fails instead of looping forever.
    lapses = models.PositiveSmallIntegerField(default=0)
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    response_body = models.JSONField(null=True, blank=True)
    error = models.JSONField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["batch", "line_no"]
        constraints = [
            models.UniqueConstraint(fields=["batch", "custom_id"], name="batch_line_custom_id"),
            models.UniqueConstraint(fields=["batch", "line_no"], name="batch_line_number"),
        ]
        indexes = [models.Index(fields=["batch", "status", "line_no"])]

    def __str__(self) -> str:
        return f"{self.batch_id}:{self.custom_id} ({self.status})"
