"""Plumbing tables shared by every app: the audit log."""

from __future__ import annotations

from django.db import models


class AuditEntry(models.Model):
    """Who changed what and when, with the values before and after. Append-only.

    Snapshots never hold secrets: provider credentials and webhook signing secrets
    appear only as whether one is set, and key secrets never at all.
    """

    actor = models.CharField(max_length=200)
    # create | update | delete | revoke | rotate, and for invoices finalize | void
    action = models.CharField(max_length=32)
    object_type = models.CharField(max_length=32)
    object_id = models.CharField(max_length=64)
    # The team the object belongs to, so team admins can read their own history.
    team_id = models.BigIntegerField(null=True, blank=True)
    before = models.JSONField(null=True, blank=True)
    after = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        # Created by the gateway app before the audit log moved here; the table kept its name.
        db_table = "gateway_auditentry"
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["object_type", "object_id"]),
            models.Index(fields=["team_id", "created_at"]),
        ]

    def __str__(self) -> str:
        return f"{self.actor} {self.action} {self.object_type}:{self.object_id}"
