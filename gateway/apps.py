from __future__ import annotations

from typing import Any

from django.apps import AppConfig


class GatewayConfig(AppConfig):
    name = "gateway"
    verbose_name = "Gateway data plane"

    def ready(self) -> None:
        # Runs once per process before any request or task: under ASGI
        # (get_asgi_application sets Django up; config.serve does it in the parent,
        # before forking), in Celery workers and in management commands. litellm's
        # price map is local from the start: config/settings.py sets
        # LITELLM_LOCAL_MODEL_COST_MAP before anything imports litellm.
        _configure_litellm()
        _never_follow_redirects()
        _never_download_media()

        # Invoices (billing, a layer below) list the unit prices of the configured models.
        from billing import invoices
        from gateway.routing import configured_unit_prices

        invoices.register_unit_price_source(configured_unit_prices)


def _configure_litellm() -> None:
    import litellm

    # We keep our own ledger and never want litellm's callbacks, telemetry or
    # per-call cost lookups beyond what we ask for.
    litellm.telemetry = False
    litellm.suppress_debug_info = True
    litellm.drop_params = False
    # Anthropic Messages sent to an OpenAI-dialect model go through chat completions,
    # which every OpenAI-compatible server speaks and which honours stop sequences;
    # litellm's default (the Responses API) silently drops them.
    litellm.use_chat_completions_url_for_anthropic_messages = True


def _never_follow_redirects() -> None:
    """litellm's HTTP clients follow redirects; a gateway holding provider keys must not.

    A provider (or anything at an api_base) answering 30x could otherwise bounce the
    request, credentials included, to another host such as 127.0.0.1. The pass-through
    path refuses redirects itself (gateway/upstream.py); this covers the litellm path:
    the OpenAI SDK's shared client and every client litellm's own handler creates.
    """
    import httpx
    import litellm
    from litellm.llms.custom_httpx.http_handler import AsyncHTTPHandler

    litellm.aclient_session = httpx.AsyncClient(follow_redirects=False, trust_env=False)
    litellm.client_session = httpx.Client(follow_redirects=False, trust_env=False)
    create = AsyncHTTPHandler.create_client

    def create_without_redirects(self: Any, *args: Any, **kwargs: Any) -> httpx.AsyncClient:
        client: httpx.AsyncClient = create(self, *args, **kwargs)
        client.follow_redirects = False
        return client

    AsyncHTTPHandler.create_client = create_without_redirects


def _never_download_media() -> None:
    """Turn off litellm's download of image/file URLs it inlines for some providers.

    The gateway refuses such requests before routing (gateway.flow.refuse_media_downloads);
    this is the second lock, for any part shape that check does not know. Zero is
    litellm's own documented "disable image URL handling" value of this limit, read
    at call time from this module.
    """
    from litellm.litellm_core_utils.prompt_templates import image_handling

    setattr(image_handling, "MAX_IMAGE_URL_DOWNLOAD_SIZE_MB", 0)  # noqa: B010 - Final upstream
