"""The dashboard's pages, mounted at the site root (after /v1, /api and /health)."""

from __future__ import annotations

from pathlib import Path

from django.urls import path, re_path
from django.views.static import serve

from dashboard.views import (
    audit,
    invitations,
    invoices,
    keys,
    models,
    overview,
    reconciliation,
    sso,
    teams,
    usage,
    users,
    webhooks,
)

app_name = "dashboard"

STATIC_DIR = Path(__file__).resolve().parent / "static"

urlpatterns = [
    path("login/", sso.LoginView.as_view(), name="login"),
    path("logout/", sso.logout_view, name="logout"),
    path("sso/login/", sso.sso_start, name="sso-login"),
    path("sso/callback/", sso.sso_callback, name="sso-callback"),
    # "/" itself belongs to the API (django-ninja registers its root there first).
    path("overview/", overview.overview, name="overview"),
    # teams
    path("teams/", teams.team_list, name="teams"),
    path("teams/new/", teams.team_create, name="team-create"),
    path("teams/<int:team_id>/", teams.team_detail, name="team"),
    path("teams/<int:team_id>/edit/", teams.team_edit, name="team-edit"),
    path("teams/<int:team_id>/key-policy/", teams.team_key_policy, name="team-key-policy"),
    path("teams/<int:team_id>/members/add/", teams.member_add, name="member-add"),
    path("teams/<int:team_id>/invite/", invitations.invite, name="team-invite"),
    path("invite/<str:token>/", invitations.accept, name="invitation"),
    path(
        "teams/<int:team_id>/members/<int:membership_id>/role/",
        teams.member_role,
        name="member-role",
    ),
    path(
        "teams/<int:team_id>/members/<int:membership_id>/remove/",
        teams.member_remove,
        name="member-remove",
    ),
    # a team's alert recipients and webhook endpoints
    path("teams/<int:team_id>/alerts/", webhooks.alert_recipients, name="team-alerts"),
    path("teams/<int:team_id>/webhooks/", webhooks.webhook_list, name="webhooks"),
    path("teams/<int:team_id>/webhooks/new/", webhooks.webhook_create, name="webhook-create"),
    path(
        "teams/<int:team_id>/webhooks/<str:public_id>/",
        webhooks.webhook_edit,
        name="webhook",
    ),
    path(
        "teams/<int:team_id>/webhooks/<str:public_id>/delete/",
        webhooks.webhook_delete,
        name="webhook-delete",
    ),
    path(
        "teams/<int:team_id>/webhooks/<str:public_id>/deliveries/",
        webhooks.webhook_deliveries,
        name="webhook-deliveries",
    ),
    # keys
    path("keys/", keys.key_list, name="keys"),
    path("keys/new/", keys.key_issue, name="key-issue"),
    path("keys/<int:key_id>/", keys.key_detail, name="key"),
    path("keys/<int:key_id>/edit/", keys.key_edit, name="key-edit"),
    path("keys/<int:key_id>/revoke/", keys.key_revoke, name="key-revoke"),
    path("keys/<int:key_id>/rotate/", keys.key_rotate, name="key-rotate"),
    # models
    path("models/", models.model_list, name="models"),
    path("models/new/", models.deployment_create, name="deployment-create"),
    path("models/<uuid:public_id>/", models.deployment_edit, name="deployment"),
    path("models/<uuid:public_id>/delete/", models.deployment_delete, name="deployment-delete"),
    path("models/<uuid:public_id>/test/", models.deployment_test, name="deployment-test"),
    path("models/aliases/new/", models.alias_create, name="alias-create"),
    path("models/aliases/<int:alias_id>/delete/", models.alias_delete, name="alias-delete"),
    path("models/policy/<str:name>/", models.group_edit, name="group"),
    path("models/policy/<str:name>/delete/", models.group_delete, name="group-delete"),
    # usage and requests
    path("usage/", usage.usage, name="usage"),
    path("usage/export.csv", usage.usage_csv, name="usage-csv"),
    path("requests/", usage.request_list, name="requests"),
    path("requests/<int:row_id>/", usage.request_detail, name="request"),
    # reconciliation with the providers' bills
    path("reconciliation/", reconciliation.reconciliation, name="reconciliation"),
    # invoices
    path("invoices/", invoices.invoice_list, name="invoices"),
    path("invoices/draft/", invoices.invoice_draft, name="invoice-draft"),
    path("invoices/<int:invoice_id>/", invoices.invoice_detail, name="invoice"),
    path("invoices/<int:invoice_id>/finalize/", invoices.invoice_finalize, name="invoice-finalize"),
    path("invoices/<int:invoice_id>/void/", invoices.invoice_void, name="invoice-void"),
    path("invoices/<int:invoice_id>/invoice.csv", invoices.invoice_csv, name="invoice-csv"),
    path("invoices/<int:invoice_id>/print/", invoices.invoice_print, name="invoice-print"),
    # audit and people
    path("audit/", audit.audit_log, name="audit"),
    path("users/", users.user_list, name="users"),
    path("users/<int:user_id>/role/", users.user_role, name="user-role"),
    # The gateway runs under uvicorn with no static file server in front; these few
    # files (CSS, the copy button) are served from the app itself.
    re_path(r"^static/(?P<path>.+)$", serve, {"document_root": STATIC_DIR}, name="static"),
]
