from __future__ import annotations

from django.apps import AppConfig


class GatewayConfig(AppConfig):
    name = "gateway"
    verbose_name = "Gateway data plane"

    def ready(self) -> None:
        # Invoices (billing, a layer below) list the unit prices of the configured models.
        from billing import invoices
        from gateway.routing import configured_unit_prices

        invoices.register_unit_price_source(configured_unit_prices)
