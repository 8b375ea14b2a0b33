-- Payments from a provider's signed webhooks: the ledger of every verified
-- delivery, what the store did with it, and the refunds it owes.

-- The provider delivery whose success was handed to the order's checkout
-- (at most one: a second success is a refund due).
ALTER TABLE orders ADD COLUMN paid_by text;

-- Every verified provider delivery, once per delivery id, never changed:
-- what it said, what the store did with it (`outcome`), and the answer it
-- got, which a redelivery of the same id gets again.
CREATE TABLE payment_ledger (
    delivery_id   text PRIMARY KEY,
    payment_id    text NOT NULL,
    type          text NOT NULL
        CONSTRAINT payment_ledger_type_check CHECK (type IN ('payment.succeeded', 'payment.failed')),
    amount        numeric(12, 2) NOT NULL,
    currency      text NOT NULL,
    received_at   timestamptz NOT NULL DEFAULT now(),
    outcome       text NOT NULL
        CONSTRAINT payment_ledger_outcome_check
        CHECK (outcome IN ('applied', 'refund_due', 'ignored', 'mismatch', 'unknown_payment')),
    order_id      bigint REFERENCES orders (id),
    answer_status integer NOT NULL,
    answer        jsonb NOT NULL
);

CREATE INDEX payment_ledger_payment_idx ON payment_ledger (payment_id, received_at);

CREATE FUNCTION payment_ledger_append_only() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION 'payment_ledger is append-only';
END;
$$;

CREATE TRIGGER payment_ledger_append_only BEFORE UPDATE OR DELETE ON payment_ledger
    FOR EACH ROW EXECUTE FUNCTION payment_ledger_append_only();

-- Money taken for no goods: a success after the checkout expired or was
-- cancelled, a second success for one order, a success for no order.
CREATE TABLE refunds_due (
    id          bigserial PRIMARY KEY,
    delivery_id text NOT NULL CONSTRAINT refunds_due_delivery_unique UNIQUE
        REFERENCES payment_ledger (delivery_id),
    payment_id  text NOT NULL,
    order_id    bigint REFERENCES orders (id),
    amount      numeric(12, 2) NOT NULL,
    currency    text NOT NULL,
    reason      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX refunds_due_created_idx ON refunds_due (created_at DESC, id DESC);

-- A cancelled order whose checkout had been handed a provider's success
-- (it arrived as the payment window closed) owes that payment back: called
-- by the statement that cancels the order, with the order's `paid_by`.
CREATE FUNCTION refund_if_paid(p_order_id bigint, p_paid_by text) RETURNS boolean
LANGUAGE plpgsql
VOLATILE
AS $$
BEGIN
    IF p_paid_by IS NOT NULL THEN
        INSERT INTO refunds_due (delivery_id, payment_id, order_id, amount, currency, reason)
        SELECT delivery_id, payment_id, p_order_id, amount, currency, 'checkout_cancelled'
        FROM payment_ledger WHERE delivery_id = p_paid_by
        ON CONFLICT (delivery_id) DO NOTHING;
    END IF;
    RETURN true;
END;
$$;
