from __future__ import annotations

from django.apps import AppConfig


class DashboardConfig(AppConfig):
    name = "dashboard"
    verbose_name = "Web admin dashboard"

    def ready(self) -> None:
        # The gateway (a layer below) asks through this hook who is a team admin.
        from dashboard.access import user_is_team_admin
        from gateway import files

        files.register_team_admin_check(user_is_team_admin)
