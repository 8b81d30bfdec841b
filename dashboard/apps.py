from __future__ import annotations

from typing import Any

from django.apps import AppConfig


class DashboardConfig(AppConfig):
    name = "dashboard"
    verbose_name = "Web admin dashboard"

    def ready(self) -> None:
        from django.contrib.auth.models import User
        from django.db.models.signals import post_save

        # Users created outside the dashboard's own service (createsuperuser, a shell)
        # still reach the audit log.
        post_save.connect(_user_saved, sender=User, dispatch_uid="dashboard-audit-user-created")


def _user_saved(
    sender: type[Any], instance: Any, created: bool, raw: bool = False, **_: Any
) -> None:
    if created and not raw:
        from accounts import services

        services.audit_user_created_elsewhere(user=instance)
