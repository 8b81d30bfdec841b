from __future__ import annotations

from django.urls import include, path
from django.views.generic import RedirectView

from config.api import api
from gateway import health

urlpatterns = [
    path("health/live", health.live),
    path("health/ready", health.ready),
    # The site's front page is the dashboard overview (it asks for a login first).
    path("", RedirectView.as_view(url="/overview/", permanent=False)),
    path("", api.urls),
    path("", include("dashboard.urls")),
]
