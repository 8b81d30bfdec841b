"""Reads for the dashboard pages: one module per page (overview, usage, request_log,
keys, teams, models, invoices, webhooks, audit), plus what several share (common).

Reads of other apps' tables go through their selectors where one exists
(billing.usage, billing.selectors, billing.invoices, gateway.selectors).
"""
