"""The dashboard in a real browser (Debian's Chromium, headless, driven by Playwright).

A team admin signs in, issues a key and reads its secret off the page, calls the
gateway with it through the official `openai` SDK, finds the call in the request log
and the usage chart, revokes the key, and sees the next call refused. The live
gateway serves the dashboard and /v1 from the same URL, as in production.

The browser runs in a worker thread: Playwright's sync API keeps an event loop
running in its thread, where Django would refuse ORM calls.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import openai
import pytest
from django.utils import timezone
from openai import OpenAI

from accounts import services as account_services
from accounts.models import Membership, TeamRole
from billing.ledger import AttemptRecord, ledger_write
from billing.pricing import Usage
from gateway import services
from tests.dashboard.conftest import PASSWORD, make_user
from tests.support.waiting import wait_until

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
]
SCREENSHOT_COPY = Path("/tmp/dashboard-overview.png")
T = TypeVar("T")


def in_thread(fn: Callable[[], T]) -> T:
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(fn).result(timeout=300)


@pytest.fixture(scope="module")
def playwright_chromium() -> Any:
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is missing: `make test` installs Debian's chromium package.")
    return CHROMIUM


def seed_usage(team: Any, keys: list[Any], days: int = 20) -> None:
    """A few weeks of believable traffic, so the overview has something to show."""
    rng = random.Random(42)
    now = timezone.now()
    models = [
        ("gpt-4o", 9_000),
        ("claude-sonnet-4", 14_000),
        ("gpt-4o-mini", 900),
        ("llama-70b", 2_500),
    ]
    records = []
    for day in range(days):
        for n in range(rng.randint(14, 26) + day):
            model, cost = rng.choices(models, weights=[4, 2, 8, 1])[0]
            key = rng.choices(keys, weights=[6, 3, 1][: len(keys)])[0]
            started = now - timedelta(days=day, minutes=rng.randint(1, 600))
            latency = int(rng.lognormvariate(6.6, 0.4))
            failed = rng.random() < 0.02
            records.append(
                AttemptRecord(
                    request_id=f"seed-{team.id}-{day}-{n}",
                    attempt=1,
                    team_id=team.id,
                    key_id=key.id,
                    endpoint="chat.completions",
                    model=model,
                    status="error" if failed else "success",
                    http_status=502 if failed else 200,
                    started_at=started,
                    ended_at=started + timedelta(milliseconds=latency),
                    usage=Usage(
                        prompt_tokens=rng.randint(200, 2400), completion_tokens=rng.randint(40, 700)
                    ),
                    list_cost_micro_usd=0 if failed else int(cost * rng.uniform(0.5, 1.6)),
                    charged_cost_micro_usd=0 if failed else int(cost * rng.uniform(0.5, 1.6)),
                    latency_ms=latency,
                    tags=[rng.choice(["prod", "staging", "evals"])],
                )
            )
    ledger_write(records)


def test_it_issues_uses_and_revokes_a_key_in_the_browser(
    live_gateway: Any, make_model: Any, playwright_chromium: str, tmp_path: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    model = make_model()
    acme = account_services.team_create(
        name="Acme Robotics", budget_micro_usd=5_000_000, alert_thresholds=[50, 80, 100]
    )
    globex = account_services.team_create(name="Globex Research", budget_micro_usd=25_000_000)
    alice = make_user("alice")
    Membership.objects.create(user=alice, team=acme, role=TeamRole.ADMIN)
    seed_usage(
        acme,
        [
            account_services.key_create(team=acme, name=name, owner=alice).key
            for name in ("support-bot", "search-api", "nightly-evals")
        ],
    )
    seed_usage(globex, [account_services.key_create(team=globex, name="globex-prod").key], days=12)
    base = live_gateway.url
    shot = tmp_path / "overview.png"

    def browse() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=playwright_chromium, args=CHROMIUM_ARGS)
            context = browser.new_context(viewport={"width": 1440, "height": 1000})
            context.grant_permissions(["clipboard-read", "clipboard-write"], origin=base)
            page = context.new_page()
            try:
                # Sign in as the team admin.
                page.goto(f"{base}/keys/new/")
                expect(page).to_have_url(f"{base}/login/?next=/keys/new/")
                page.fill("#id_username", "alice")
                page.fill("#id_password", PASSWORD)
                page.click("button[type=submit]")
                expect(page).to_have_url(f"{base}/keys/new/")

                # Issue a key; the secret is on the page exactly once.
                page.fill("#id_name", "browser test key")
                page.click("[data-testid=issue-key]")
                secret_box = page.locator("[data-testid=secret]")
                expect(secret_box).to_be_visible()
                seen["secret"] = secret_box.input_value()
                seen["snippet"] = page.locator("#snippet-openai").text_content()
                page.click("button[data-copy='#secret']")
                seen["clipboard"] = page.evaluate("navigator.clipboard.readText()")
                key_url = page.locator("a.btn.primary", has_text="continue").get_attribute("href")

                # Call the gateway with it, through the official SDK.
                client = OpenAI(base_url=f"{base}/v1", api_key=seen["secret"], max_retries=0)
                reply = client.chat.completions.create(
                    model=model.name, messages=[{"role": "user", "content": "Hello"}]
                )
                seen["answer"] = reply.choices[0].message.content

                # The call is in the request log, and its detail shows no secret.
                page.goto(f"{base}/requests/")
                row = page.locator("[data-testid=request-log] tbody tr", has_text=model.name)
                expect(row).to_have_count(1)
                row.locator("a").first.click()
                expect(page.locator("h1")).to_contain_text("req_")
                seen["detail"] = page.content()

                # And in the usage explorer's charts.
                page.goto(f"{base}/usage/?model={model.name}")
                expect(page.locator("[data-testid=usage-requests]")).to_have_text("1")
                bars = page.locator("[data-testid=chart-requests] svg rect")
                expect(bars).to_have_count(1)
                seen["bar_title"] = bars.first.locator("title").text_content()

                # The key's page knows it was used; then revoke it.
                page.goto(f"{base}{key_url}")
                expect(page.locator("[data-testid=last-used]")).not_to_have_text("Never")
                page.click("[data-testid=revoke]")
                expect(page.locator("[data-testid=key-status]")).to_have_text("Revoked")

                def refused() -> bool:
                    try:
                        client.chat.completions.create(
                            model=model.name, messages=[{"role": "user", "content": "Again"}]
                        )
                    except openai.AuthenticationError as exc:
                        seen["refusal"] = exc.status_code
                        return True
                    return False

                wait_until(refused, timeout=3.0, interval=0.2)

                # The overview, for people to look at.
                page.goto(f"{base}/overview/")
                expect(page.locator("[data-testid=kpi-requests]")).to_be_visible()
                page.screenshot(path=str(shot), full_page=True)
            finally:
                browser.close()
        return seen

    seen = in_thread(browse)

    secret = seen["secret"]
    assert secret.startswith("sk-gw-") and len(secret) > 40
    assert seen["clipboard"] == secret
    assert f'base_url="{base}/v1"' in seen["snippet"] and secret in seen["snippet"]
    assert seen["answer"]
    assert secret not in seen["detail"] and "sk-provider" not in seen["detail"]
    assert model.name in seen["bar_title"] or "All" in seen["bar_title"]
    assert seen["refusal"] == 401
    assert shot.stat().st_size > 10_000
    shutil.copyfile(shot, SCREENSHOT_COPY)


INVOICE_SCREENSHOT_COPY = Path("/tmp/dashboard-invoice.png")


def test_it_shows_an_invoice_to_finance_in_the_browser(
    live_gateway: Any, playwright_chromium: str, tmp_path: Path, settings: Any
) -> None:
    """Finance opens a finalized invoice: its number, lines and totals, and the void form;
    the team's admin sees the same invoice without it."""
    from decimal import Decimal

    from playwright.sync_api import expect, sync_playwright

    from accounts.models import PlatformRole, StaffRole
    from billing import invoices
    from tests.dashboard.conftest import mid_month, month_ago

    acme = account_services.team_create(
        name="Acme Robotics", budget_micro_usd=5_000_000_000, markup_percent=Decimal("12.5")
    )
    fiona = make_user("fiona")
    StaffRole.objects.create(user=fiona, role=PlatformRole.FINANCE)
    alice = make_user("alice")
    Membership.objects.create(user=alice, team=acme, role=TeamRole.ADMIN)
    keys = [
        account_services.key_create(team=acme, name=n).key for n in ("support-bot", "search-api")
    ]
    catalogue = [
        ("openai", "gpt-4o", 14_000),
        ("openai", "gpt-4o-mini", 900),
        ("anthropic", "claude-sonnet-4", 21_000),
        ("openai", "text-embedding-3-small", 40),
    ]
    # Configured prices: the invoice lines show them per token kind.
    for provider, model, input_price, output_price in (
        ("openai", "gpt-4o", "2.50", "10"),
        ("openai", "gpt-4o-mini", "0.15", "0.60"),
        ("anthropic", "claude-sonnet-4", "3", "15"),
        ("openai", "text-embedding-3-small", "0.02", "0"),
    ):
        services.deployment_create(
            name=model,
            provider_model=f"{provider}/{model}",
            input_cost_per_million=Decimal(input_price),
            output_cost_per_million=Decimal(output_price),
            cached_input_cost_per_million=Decimal(input_price) / 2,
        )
    rng = random.Random(7)
    records = []
    for months, count in ((2, 40), (1, 160)):
        for n in range(count):
            provider, model, cost = rng.choice(catalogue)
            started = mid_month(months, hours=rng.randint(-300, 300))
            list_cost = int(cost * rng.uniform(0.5, 1.6))
            records.append(
                AttemptRecord(
                    request_id=f"inv-{months}-{n}",
                    attempt=1,
                    team_id=acme.id,
                    key_id=rng.choice(keys).id,
                    endpoint="chat.completions",
                    model=model,
                    status="success",
                    http_status=200,
                    started_at=started,
                    ended_at=started + timedelta(milliseconds=800),
                    usage=Usage(
                        prompt_tokens=rng.randint(200, 2400),
                        completion_tokens=rng.randint(40, 700),
                        cached_read_tokens=rng.choice([0, 0, 512]),
                    ),
                    list_cost_micro_usd=list_cost,
                    charged_cost_micro_usd=list_cost + list_cost // 8,
                    latency_ms=800,
                    provider=provider,
                    provider_model=f"{provider}/{model}",
                    is_batch=model == "gpt-4o-mini" and n % 3 == 0,
                )
            )
    ledger_write(records[:40])
    # Invoices cover the rows written a moment ago (by default they trail "now" by a minute).
    settings.GATEWAY_INVOICE_CUTOFF_LAG_SECONDS = 0
    year, month = month_ago(2)
    earlier = invoices.invoice_draft(team_id=acme.id, year=year, month=month)
    invoices.invoice_finalize(invoice_id=earlier.id)
    # Rows of that month recorded afterwards become adjustments on the next invoice.
    late = mid_month(2, hours=5)
    ledger_write(
        [
            AttemptRecord(
                request_id=f"inv-late-{i}",
                attempt=1,
                team_id=acme.id,
                key_id=keys[0].id,
                endpoint="chat.completions",
                model="gpt-4o",
                status="success",
                http_status=200,
                started_at=late,
                ended_at=late + timedelta(seconds=1),
                usage=Usage(prompt_tokens=900, completion_tokens=300),
                list_cost_micro_usd=9_000,
                charged_cost_micro_usd=10_125,
                latency_ms=1000,
                provider="openai",
                provider_model="openai/gpt-4o",
            )
            for i in range(3)
        ]
        + records[40:]
    )
    year, month = month_ago(1)
    draft = invoices.invoice_draft(team_id=acme.id, year=year, month=month)
    invoice = invoices.invoice_finalize(invoice_id=draft.id)
    number = invoice.number
    assert number
    base = live_gateway.url
    shot = tmp_path / "invoice.png"

    def sign_in(page: Any, username: str, target: str) -> None:
        page.goto(f"{base}{target}")
        page.fill("#id_username", username)
        page.fill("#id_password", PASSWORD)
        page.click("button[type=submit]")
        expect(page).to_have_url(f"{base}{target}")

    def browse() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        url = f"/invoices/{invoice.id}/"
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=playwright_chromium, args=CHROMIUM_ARGS)
            try:
                page = browser.new_context(viewport={"width": 1440, "height": 1000}).new_page()
                sign_in(page, "fiona", url)
                expect(page.locator("[data-testid=invoice-number]")).to_have_text(number)
                expect(page.locator("[data-testid=invoice-status]")).to_have_text("Finalized")
                seen["total"] = page.locator("[data-testid=invoice-total]").text_content()
                seen["void"] = page.locator("[data-testid=void]").count()
                seen["adjustments"] = page.locator("[data-testid=adjustments] tbody tr").count()
                page.screenshot(path=str(shot), full_page=True)
                with page.expect_popup() as popup:
                    page.click("[data-testid=invoice-print]")
                printable = popup.value
                printable.wait_for_load_state()
                seen["printable"] = printable.content()

                admin = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
                sign_in(admin, "alice", url)
                expect(admin.locator("[data-testid=invoice-number]")).to_have_text(number)
                seen["admin_void"] = admin.locator("[data-testid=void]").count()
            finally:
                browser.close()
        return seen

    seen = in_thread(browse)
    assert seen["void"] == 1 and seen["admin_void"] == 0
    assert seen["adjustments"] == 1  # the three late gpt-4o rows, on one line
    total = invoice.total_micro_usd
    assert seen["total"].replace(",", "").startswith(f"${total // 1_000_000}.")
    assert invoice.number in seen["printable"]
    assert shot.stat().st_size > 10_000
    shutil.copyfile(shot, INVOICE_SCREENSHOT_COPY)
