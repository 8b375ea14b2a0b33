-- The widget store: one product, its orders, and the function that gives a
-- cancelled order's unit back. The workflow engine keeps its own schema
-- (shared/engine/migrations).

CREATE TABLE products (
    id          integer PRIMARY KEY,
    name        text NOT NULL,
    description text NOT NULL,
    inventory   integer NOT NULL CONSTRAINT products_inventory_nonnegative CHECK (inventory >= 0),
    price       numeric(12, 2) NOT NULL CONSTRAINT products_price_nonnegative CHECK (price >= 0)
);

INSERT INTO products (id, name, description, inventory, price)
VALUES (1, 'Premium Quality Widget', 'Enhance your productivity with our top-rated widgets!', 100, 99.99);

CREATE TABLE orders (
    id                 bigserial PRIMARY KEY,
    product_id         integer NOT NULL REFERENCES products (id),
    checkout_id        text NOT NULL CONSTRAINT orders_checkout_id_unique UNIQUE,
    status             text NOT NULL
        CONSTRAINT orders_status_check CHECK (status IN ('PENDING', 'PAID', 'DISPATCHED', 'CANCELLED')),
    progress_remaining integer NOT NULL DEFAULT 10
        CONSTRAINT orders_progress_range CHECK (progress_remaining BETWEEN 0 AND 10),
    created_at         timestamptz NOT NULL DEFAULT now(),
    last_update_time   timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX orders_created_idx ON orders (created_at DESC, id DESC);

-- A cancelled order gives its unit back in the same statement that cancels
-- it (store::cancel_order), so that the product row, every checkout's lock,
-- is held only while that statement runs: an order's status and the stock
-- change together without a transaction of several round trips.
CREATE FUNCTION return_unit(p_product_id integer) RETURNS boolean
LANGUAGE plpgsql
VOLATILE
AS $$
BEGIN
    UPDATE products SET inventory = inventory + 1 WHERE id = p_product_id;
    RETURN FOUND;
END;
$$;
