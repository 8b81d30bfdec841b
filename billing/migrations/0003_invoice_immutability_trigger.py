"""Finalized invoices are immutable in the database too, not only in Invoice.save().

On Postgres, triggers refuse any change to a finalized or void invoice except
finalized → void (with voided_at / void_reason), deleting one, and any insert,
update or delete of the lines of an invoice that is no longer a draft. Elsewhere
(the embedded SQLite default) the model's save()/delete() guard alone applies.
"""

from django.db import migrations

FORWARD = """
CREATE OR REPLACE FUNCTION billing_invoice_guard() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        IF OLD.status <> 'draft' THEN
            RAISE EXCEPTION 'invoice % is %: it cannot be deleted', OLD.number, OLD.status
                USING ERRCODE = 'integrity_constraint_violation';
        END IF;
        RETURN OLD;
    END IF;
    IF OLD.status = 'draft' THEN
        RETURN NEW;
    END IF;
    IF OLD.status = 'finalized' AND NEW.status = 'void'
        AND (to_jsonb(NEW) - ARRAY['status', 'voided_at', 'void_reason'])
            = (to_jsonb(OLD) - ARRAY['status', 'voided_at', 'void_reason']) THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'invoice % is %: it can no longer change', OLD.number, OLD.status
        USING ERRCODE = 'integrity_constraint_violation';
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER billing_invoice_guard
    BEFORE UPDATE OR DELETE ON billing_invoice
    FOR EACH ROW EXECUTE FUNCTION billing_invoice_guard();

CREATE OR REPLACE FUNCTION billing_invoiceline_guard() RETURNS trigger AS $$
DECLARE
    invoice_status text;
BEGIN
    SELECT status INTO invoice_status FROM billing_invoice
        WHERE id = CASE WHEN TG_OP = 'DELETE' THEN OLD.invoice_id ELSE NEW.invoice_id END;
    IF TG_OP = 'UPDATE' AND OLD.invoice_id <> NEW.invoice_id THEN
        RAISE EXCEPTION 'invoice lines cannot move between invoices'
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF invoice_status IS NOT NULL AND invoice_status <> 'draft' THEN
        RAISE EXCEPTION 'the lines of a % invoice cannot change', invoice_status
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER billing_invoiceline_guard
    BEFORE INSERT OR UPDATE OR DELETE ON billing_invoiceline
    FOR EACH ROW EXECUTE FUNCTION billing_invoiceline_guard();
"""

BACKWARD = """
DROP TRIGGER IF EXISTS billing_invoiceline_guard ON billing_invoiceline;
DROP FUNCTION IF EXISTS billing_invoiceline_guard();
DROP TRIGGER IF EXISTS billing_invoice_guard ON billing_invoice;
DROP FUNCTION IF EXISTS billing_invoice_guard();
"""


def forward(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(FORWARD, params=None)


def backward(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(BACKWARD, params=None)


class Migration(migrations.Migration):
    dependencies = [("billing", "0002_rollups_invoices_notifications")]

    operations = [migrations.RunPython(forward, backward)]
