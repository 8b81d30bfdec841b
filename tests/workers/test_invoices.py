"""Unified invoices: exact totals, gap-free numbers, immutability, late rows as adjustments."""

from __future__ import annotations

import random
from datetime import timedelta

import pytest
from django.db import DatabaseError, connection, transaction
from django.utils import timezone

from billing import invoices
from billing.models import Invoice, InvoiceImmutable, InvoiceLine, LedgerEntry, WebhookDelivery
from billing.pricing import Usage
from core.models import AuditEntry
from tests.support.money import ledger_row, write
from tests.support.waiting import wait_for
from tests.support.workers import send_task

pytestmark = pytest.mark.e2e


def months_back(tz: str, n: int) -> invoices.Month:
    month = invoices.month_containing(tz, timezone.now())
    for _ in range(n):
        month = invoices.month_of(
            tz, month.year - (month.month == 1), 12 if month.month == 1 else month.month - 1
        )
    return month


# Rows recorded this long ago are past any invoice's cutoff lag (a minute by default).
SETTLED = timedelta(minutes=5)


def usage_in(team, month: invoices.Month, count: int, rng: random.Random) -> list:
    span = int((month.end - month.start).total_seconds()) - 1
    return write(
        [
            ledger_row(
                team_id=team.id,
                started_at=month.start + timedelta(seconds=rng.randint(0, span)),
                model=rng.choice(["gpt-x", "claude-y", "embed-z"]),
                provider=rng.choice(["openai", "anthropic"]),
                usage=Usage(rng.randint(1, 9000), rng.randint(0, 3000), rng.randint(0, 500)),
                list_cost=(lc := rng.randint(0, 90_000)),
                charged=lc * 115 // 100,
                is_batch=rng.random() < 0.2,
            )
            for _ in range(count)
        ],
        age=SETTLED,
    )


def test_it_drafts_closed_months_and_the_total_equals_the_ledger(worker, make_team, live_gateway):
    rng = random.Random(11)
    team = make_team(timezone="America/Los_Angeles", markup_percent=15)
    last = months_back(team.timezone, 1)
    # The drafting task only looks back to the month the team was created.
    type(team).objects.filter(id=team.id).update(created_at=last.start + timedelta(days=1))
    rows = usage_in(team, last, 120, rng)
    # Usage of the current (open) month and of another team stay off this invoice.
    write([ledger_row(team_id=team.id, started_at=timezone.now() - timedelta(seconds=5))])
    write([ledger_row(team_id=team.id + 10_000, started_at=last.start + timedelta(hours=1))])

    send_task("billing.invoices_draft_due")
    invoice = wait_for(
        lambda: Invoice.objects.filter(team_id=team.id, period_start=last.start).first(),
        30,
        what="the drafting task",
    )
    assert invoice.status == "draft" and invoice.number is None
    assert invoice.period_label == last.label
    drafted = AuditEntry.objects.get(object_type="invoice", object_id=str(invoice.id))
    assert (drafted.actor, drafted.action, drafted.team_id) == ("system", "create", team.id)
    assert drafted.before is None and drafted.after is not None
    assert drafted.after["total_micro_usd"] == invoice.total_micro_usd
    assert invoice.total_micro_usd == sum(r.charged_cost_micro_usd for r in rows)
    assert invoice.total_micro_usd == invoices.ledger_charged_sum(invoice)
    assert invoice.subtotal_micro_usd == sum(r.list_cost_micro_usd for r in rows)
    assert invoice.subtotal_micro_usd + invoice.markup_micro_usd == invoice.total_micro_usd
    lines = list(invoice.lines.all())
    assert sum(line.amount_micro_usd for line in lines) == invoice.total_micro_usd
    assert sum(line.requests for line in lines) == len(rows) == invoice.ledger_rows
    assert {(line.provider, line.model, line.is_batch) for line in lines} == {
        (r.provider, r.model, r.is_batch) for r in rows
    }
    assert sum(line.prompt_tokens for line in lines) == sum(r.usage.prompt_tokens for r in rows)

    # Idempotent: a second run drafts nothing new.
    send_task("billing.invoices_draft_due")
    send_task("billing.invoices_draft_due")
    wait_for(lambda: Invoice.objects.get(id=invoice.id).computed_at > invoice.computed_at, 30)
    assert Invoice.objects.filter(team_id=team.id).count() == 1
    # Recomputed with nothing new: no entry for the bookkeeping alone.
    assert not AuditEntry.objects.filter(object_type="invoice", action="update").filter(
        object_id=str(invoice.id)
    )

    with live_gateway.admin() as admin:
        final = admin.post(f"/invoices/{invoice.id}/finalize")
        assert final.status_code == 200, final.text
        body = final.json()
        year = timezone.now().year
        assert body["number"].startswith(f"INV-{year}-") and len(body["number"]) == len(
            "INV-2026-000001"
        )
        assert body["status"] == "finalized"
        assert (
            body["total_usd"]
            == f"{invoice.total_micro_usd // 10**6}.{invoice.total_micro_usd % 10**6:06d}"
        )
        # Finalizing twice is a no-op.
        assert admin.post(f"/invoices/{invoice.id}/finalize").json()["number"] == body["number"]

        csv = admin.get(f"/invoices/{invoice.id}/csv")
        assert csv.status_code == 200 and csv.headers["content-type"].startswith("text/csv")
        assert body["number"] in csv.headers["content-disposition"]
        total_row = csv.text.strip().splitlines()[-1].split(",")
        assert total_row[3] == "total" and total_row[-1] == body["total_usd"]

        html = admin.get(f"/invoices/{invoice.id}/html")
        assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
        assert body["number"] in html.text and f"${body['total_usd']}" in html.text
        assert "@media print" in html.text

        listed = admin.get("/invoices", params={"team_id": team.id}).json()
        assert [i["number"] for i in listed["items"]] == [body["number"]]
        assert admin.get("/invoices/999999").status_code == 404


def test_invoice_changes_through_the_api_are_audited_with_before_and_after(make_team, live_gateway):
    rng = random.Random(3)
    team = make_team()
    last = months_back(team.timezone, 1)
    rows = usage_in(team, last, 5, rng)
    period = {"year": last.year, "month": last.month}
    with live_gateway.admin() as admin:
        drafted = admin.post(f"/teams/{team.id}/invoices", json=period)
        assert drafted.status_code == 200, drafted.text
        invoice_id = drafted.json()["id"]
        # A late row of that month: the next draft request recomputes a different total.
        late = usage_in(team, last, 1, rng)
        assert admin.post(f"/teams/{team.id}/invoices", json=period).status_code == 200
        # Nothing new: the recompute moves only its bookkeeping, and records nothing.
        assert admin.post(f"/teams/{team.id}/invoices", json=period).status_code == 200
        final = admin.post(f"/invoices/{invoice_id}/finalize")
        assert final.status_code == 200, final.text
        assert admin.post(f"/invoices/{invoice_id}/finalize").status_code == 200  # a no-op
        voided = admin.post(f"/invoices/{invoice_id}/void", json={"reason": "wrong team"})
        assert voided.status_code == 200, voided.text

    entries = list(
        AuditEntry.objects.filter(object_type="invoice", object_id=str(invoice_id)).order_by("id")
    )
    assert [(e.actor, e.action, e.team_id) for e in entries] == [
        ("admin-api", "create", team.id),
        ("admin-api", "update", team.id),
        ("admin-api", "finalize", team.id),
        ("admin-api", "void", team.id),
    ]
    create, update, finalize, void = entries
    first = sum(r.charged_cost_micro_usd for r in rows)
    second = first + sum(r.charged_cost_micro_usd for r in late)
    assert create.before is None and create.after is not None
    assert update.before is not None and update.after is not None
    assert finalize.before is not None and finalize.after is not None
    assert void.before is not None and void.after is not None
    assert (create.after["status"], create.after["total_micro_usd"]) == ("draft", first)
    assert create.after["period_label"] == last.label
    assert (update.before["total_micro_usd"], update.after["total_micro_usd"]) == (first, second)
    assert (update.before["ledger_rows"], update.after["ledger_rows"]) == (5, 6)
    assert (finalize.before["status"], finalize.before["number"]) == ("draft", None)
    assert finalize.after["status"] == "finalized"
    assert finalize.after["number"] == final.json()["number"]
    assert (void.before["status"], void.after["status"]) == ("finalized", "void")
    assert (void.before["void_reason"], void.after["void_reason"]) == ("", "wrong team")
    assert void.after["voided_at"] is not None


def test_it_numbers_invoices_without_gaps(worker, make_team):
    teams = [make_team() for _ in range(3)]
    drafts = []
    month = months_back("UTC", 1)
    for team in teams:
        write(
            [ledger_row(team_id=team.id, started_at=month.start + timedelta(hours=2))], age=SETTLED
        )
        drafts.append(invoices.invoice_draft(team_id=team.id, year=month.year, month=month.month))
    numbers = [invoices.invoice_finalize(invoice_id=d.id).number for d in drafts]
    sequence = [int(str(n).rsplit("-", 1)[1]) for n in numbers]
    assert sequence == list(range(sequence[0], sequence[0] + 3))


def test_finalized_invoices_are_immutable_in_the_model_and_the_database(worker, make_team):
    team = make_team()
    month = months_back("UTC", 1)
    write([ledger_row(team_id=team.id, started_at=month.start + timedelta(hours=1))], age=SETTLED)
    draft = invoices.invoice_draft(team_id=team.id, year=month.year, month=month.month)
    invoice = invoices.invoice_finalize(invoice_id=draft.id)

    invoice.total_micro_usd += 1
    with pytest.raises(InvoiceImmutable):
        invoice.save()
    with pytest.raises(InvoiceImmutable):
        invoice.delete()
    line = invoice.lines.first()
    assert line is not None
    line.amount_micro_usd += 1
    with pytest.raises(InvoiceImmutable):
        line.save()
    # Underneath the ORM's save(), the database refuses too.
    for statement in (
        "UPDATE billing_invoice SET total_micro_usd = total_micro_usd + 1 WHERE id = %s",
        "DELETE FROM billing_invoice WHERE id = %s",
        "UPDATE billing_invoiceline SET amount_micro_usd = 0 WHERE invoice_id = %s",
        "DELETE FROM billing_invoiceline WHERE invoice_id = %s",
    ):
        with pytest.raises(DatabaseError), transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(statement, [invoice.id])
    with pytest.raises(DatabaseError), transaction.atomic():
        # bulk_create skips save(): the trigger is what refuses it.
        InvoiceLine.objects.bulk_create(
            [InvoiceLine(invoice=invoice, position=99, kind="usage", model="x", description="x")]
        )
    with pytest.raises(DatabaseError), transaction.atomic():
        Invoice.objects.filter(id=invoice.id).update(status="draft")
    fresh = Invoice.objects.get(id=invoice.id)
    assert fresh.total_micro_usd == invoice.total_micro_usd - 1
    assert fresh.status == "finalized"

    # finalized → void is the one change left; the webhook outbox saw the finalization.
    voided = invoices.invoice_void(invoice_id=invoice.id, reason="issued in error")
    assert voided.status == "void" and voided.number == fresh.number
    with pytest.raises(DatabaseError), transaction.atomic():
        Invoice.objects.filter(id=invoice.id).update(status="finalized")
    assert not WebhookDelivery.objects.exists()  # no endpoint configured: nothing queued


def test_a_late_row_goes_onto_the_next_invoice_as_an_adjustment(worker, make_team, live_gateway):
    rng = random.Random(5)
    team = make_team(timezone="Asia/Kolkata")
    feb, mar = months_back(team.timezone, 2), months_back(team.timezone, 1)
    feb_rows = usage_in(team, feb, 30, rng)
    mar_rows = usage_in(team, mar, 40, rng)

    with live_gateway.admin() as admin:
        later = admin.post(
            f"/teams/{team.id}/invoices", json={"year": mar.year, "month": mar.month}
        )
        assert later.status_code == 200, later.text
    # February was finalized a few minutes ago (its cutoff is a minute before that).
    earlier = timezone.now() - timedelta(minutes=4)
    draft = invoices.invoice_draft(team_id=team.id, year=feb.year, month=feb.month, now=earlier)
    with live_gateway.admin() as admin:
        # Months are finalized in order: March waits for February.
        refused = admin.post(f"/invoices/{later.json()['id']}/finalize")
        assert refused.status_code == 409, refused.text
    feb_invoice = invoices.invoice_finalize(invoice_id=draft.id, now=earlier)
    assert feb_invoice.total_micro_usd == sum(r.charged_cost_micro_usd for r in feb_rows)

    # A February row recorded after February's invoice was finalized (a late stream, a
    # replayed spool): it must not change February, and must not be lost.
    late = write(
        [
            ledger_row(
                team_id=team.id,
                started_at=feb.start + timedelta(days=3),
                charged=777,
                list_cost=700,
            )
        ],
        age=timedelta(minutes=3),
    )[0]
    assert (
        LedgerEntry.objects.get(request_id=late.request_id).created_at > feb_invoice.ledger_cutoff
    )
    assert Invoice.objects.get(id=feb_invoice.id).total_micro_usd == feb_invoice.total_micro_usd

    with live_gateway.admin() as admin:
        second = admin.post(f"/invoices/{later.json()['id']}/finalize")
        assert second.status_code == 200, second.text
        out = second.json()
    mar_invoice = Invoice.objects.get(id=out["id"])
    adjustments = [line for line in out["lines"] if line["kind"] == "adjustment"]
    assert len(adjustments) == 1
    assert (
        adjustments[0]["usage_period"] == feb.label and adjustments[0]["amount_usd"] == "0.000777"
    )
    assert mar_invoice.total_micro_usd == sum(r.charged_cost_micro_usd for r in mar_rows) + 777
    assert mar_invoice.total_micro_usd == invoices.ledger_charged_sum(mar_invoice)
    assert int(out["number"][-6:]) == int(str(feb_invoice.number)[-6:]) + 1

    # Every row of the team up to March's end is on exactly one finalized invoice.
    covered = set(invoices.invoice_rows(feb_invoice).values_list("id", flat=True))
    covered_mar = set(invoices.invoice_rows(mar_invoice).values_list("id", flat=True))
    assert not covered & covered_mar
    assert covered | covered_mar == set(
        LedgerEntry.objects.filter(team_id=team.id, started_at__lt=mar.end).values_list(
            "id", flat=True
        )
    )
    assert late.request_id in set(
        LedgerEntry.objects.filter(id__in=covered_mar).values_list("request_id", flat=True)
    )

    # Only the latest finalized invoice can be voided; voiding it hands its rows on.
    with live_gateway.admin() as admin:
        assert admin.post(f"/invoices/{feb_invoice.id}/void", json={}).status_code == 409
        assert (
            admin.post(f"/invoices/{mar_invoice.id}/void", json={"reason": "x"}).json()["status"]
            == "void"
        )
        again = admin.post(
            f"/teams/{team.id}/invoices", json={"year": mar.year, "month": mar.month}
        )
        assert again.status_code == 200 and again.json()["id"] != mar_invoice.id
        assert again.json()["total_usd"] == out["total_usd"]
