from __future__ import annotations

from django.urls import path

from config.api import api
from gateway import health

urlpatterns = [
    path("health/live", health.live),
    path("health/ready", health.ready),
    path("", api.urls),
]
