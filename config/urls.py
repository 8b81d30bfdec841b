from __future__ import annotations

from django.urls import include, path
from django.views.generic import RedirectView

from config.api import api
from gateway import api_scim, health

urlpatterns = [
    path("health/live", health.live),
    path("health/ready", health.ready),
    # SCIM 2.0 provisioning (bearer GATEWAY_SCIM_TOKEN); before the dashboard's routes.
    path("scim/v2/", include(api_scim.urlpatterns)),
    # The site's front page is the dashboard overview (it asks for a login first).
    path("", RedirectView.as_view(url="/overview/", permanent=False)),
    path("", api.urls),
    path("", include("dashboard.urls")),
]
