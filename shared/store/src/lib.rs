//! Widget Store's shared library: the store's domain (its workflow kinds,
//! their inputs, and every SQL statement on `products` and `orders`: the
//! repository), the payment ledger, the pool and migrations, logging, and
//! the demo's crash requests. The durable workflow engine is a crate of its own (`engine`).

#![warn(missing_docs)]

pub mod chaos;
pub mod db;
pub mod holds;
pub mod payments;
pub mod shutdown;
pub mod telemetry;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgPool;

use engine::WorkflowKind;
use engine::step::{ForEach, Statement, state::Unflushed};

/// The checkout workflow: reserve, create the order, wait for payment.
pub const CHECKOUT: WorkflowKind = WorkflowKind {
    name: "checkout",
    queue: "checkout",
};

/// The dispatch workflow of a paid order: ten progress steps.
pub const DISPATCH: WorkflowKind = WorkflowKind {
    name: "dispatch",
    queue: "dispatch",
};

/// The one product's id.
pub const WIDGET_ID: i32 = 1;

/// Stock after a restock without a body.
pub const DEFAULT_STOCK: i32 = 100;

/// Progress steps of a dispatch.
pub const DISPATCH_STEPS: i32 = 10;

/// Event keys and message topics the store's workflows use.
pub mod topics {
    /// Event: the payment id handed to the shopper (null when out of stock).
    pub const PAYMENT_ID: &str = "payment_id";
    /// Event: the order id once the payment is settled.
    pub const ORDER_ID: &str = "order_id";
    /// Event: how the payment was settled: "paid", "failed" or "timed_out".
    pub const PAYMENT_OUTCOME: &str = "payment_outcome";
    /// Message topic (and deduplication key) of the payment webhook.
    pub const PAYMENT_STATUS: &str = "payment_status";
}

/// Input of a checkout workflow.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CheckoutInput {
    /// The product bought.
    pub product_id: i32,
    /// The `x-request-id` of the request that started it: its executions'
    /// log lines carry it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The client's IP address (what [`holds`] caps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
}

impl CheckoutInput {
    /// The product bought (0, from a client of the demo: the widget).
    pub fn product(&self) -> i32 {
        if self.product_id == 0 {
            WIDGET_ID
        } else {
            self.product_id
        }
    }
}

/// Input of a dispatch workflow.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DispatchInput {
    /// The paid order.
    pub order_id: i64,
}

/// The id of the dispatch workflow of an order.
pub fn dispatch_workflow_id(order_id: i64) -> String {
    format!("dispatch-{order_id}")
}

/// What the payment provider reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaymentStatus {
    /// Paid.
    Paid,
    /// Failed (declined, abandoned).
    Failed,
}

impl PaymentStatus {
    /// Parses the webhook's path segment.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "paid" => Some(PaymentStatus::Paid),
            "failed" => Some(PaymentStatus::Failed),
            _ => None,
        }
    }

    /// The wire form.
    pub fn as_str(self) -> &'static str {
        match self {
            PaymentStatus::Paid => "paid",
            PaymentStatus::Failed => "failed",
        }
    }
}

/// An order's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OrderStatus {
    /// Created, awaiting payment.
    Pending,
    /// Paid, being dispatched.
    Paid,
    /// Dispatched.
    Dispatched,
    /// Payment failed or timed out; the unit went back to stock.
    Cancelled,
}

impl OrderStatus {
    /// Parses the stored form.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "PENDING" => OrderStatus::Pending,
            "PAID" => OrderStatus::Paid,
            "DISPATCHED" => OrderStatus::Dispatched,
            "CANCELLED" => OrderStatus::Cancelled,
            _ => return None,
        })
    }

    /// The stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Pending => "PENDING",
            OrderStatus::Paid => "PAID",
            OrderStatus::Dispatched => "DISPATCHED",
            OrderStatus::Cancelled => "CANCELLED",
        }
    }

    /// The original demo's integer code.
    pub fn demo_code(self) -> i32 {
        match self {
            OrderStatus::Pending => 0,
            OrderStatus::Dispatched => 1,
            OrderStatus::Paid => 2,
            OrderStatus::Cancelled => -1,
        }
    }
}

/// The product as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Product {
    /// Id.
    pub id: i32,
    /// Name.
    pub name: String,
    /// Description.
    pub description: String,
    /// Units in stock.
    pub inventory: i32,
    /// Price, exact.
    pub price: Decimal,
}

/// An order as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Order {
    /// Id.
    pub id: i64,
    /// The checkout (workflow id, idempotency key) that created it.
    pub checkout_id: String,
    /// Status, stored form.
    pub status: String,
    /// Dispatch steps left.
    pub progress_remaining: i32,
    /// Created at.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub last_update_time: DateTime<Utc>,
}

impl Order {
    /// The parsed status.
    pub fn order_status(&self) -> OrderStatus {
        OrderStatus::parse(&self.status).unwrap_or(OrderStatus::Pending)
    }
}

/// `SELECT <order columns> FROM orders <rest>` as one literal.
macro_rules! select_orders {
    ($rest:literal) => {
        concat!(
            "SELECT id, checkout_id, status, progress_remaining, created_at, last_update_time FROM orders ",
            $rest
        )
    };
}

/// The product.
pub async fn product(pool: &PgPool) -> Result<Product, sqlx::Error> {
    sqlx::query_as("SELECT id, name, description, inventory, price FROM products WHERE id = $1")
        .bind(WIDGET_ID)
        .fetch_one(pool)
        .await
}

/// Sets the stock.
pub async fn restock(pool: &PgPool, inventory: i32) -> Result<Product, sqlx::Error> {
    sqlx::query_as(
        "UPDATE products SET inventory = $2 WHERE id = $1
         RETURNING id, name, description, inventory, price",
    )
    .bind(WIDGET_ID)
    .bind(inventory)
    .fetch_one(pool)
    .await
}

/// The step that takes one unit if there is one: its output is `true`, or
/// null when out of stock. One statement, so the product row (every
/// checkout's lock) is held only while it runs.
///
/// Its commit does not wait for the WAL flush ([`Statement::unflushed`]):
/// a flushed commit holds the row lock through the flush, which sets the
/// checkout's tail latency under load (docs/benchmarks/profile.md). Nothing is lost
/// by it: a database crash can drop the reservation only together with its
/// checkpoint, before anything outside saw it (the payment id, or "out of
/// stock", goes out with the checkout's next commit, which is flushed and
/// carries this one), so the checkout replays it.
pub fn reserve_inventory(product_id: i32) -> Statement<Unflushed> {
    Statement::new(
        "UPDATE products SET inventory = inventory - 1 WHERE id = $1 AND inventory > 0
         RETURNING true AS output",
    )
    .bind(product_id)
    .unflushed()
}

/// The step that creates the PENDING order of a checkout: its output is
/// the order's id.
pub fn create_order(product_id: i32, checkout_id: &str) -> Statement {
    Statement::new(
        "INSERT INTO orders (product_id, checkout_id, status, progress_remaining)
         VALUES ($1, $2, 'PENDING', $3) RETURNING id AS output",
    )
    .bind(product_id)
    .bind(checkout_id.to_owned())
    .bind(DISPATCH_STEPS)
}

/// The step that marks a PENDING order PAID: its output is `true`, or null
/// when the order was not pending.
pub fn mark_paid(order_id: i64) -> Statement {
    Statement::new(
        "UPDATE orders SET status = 'PAID', last_update_time = now()
         WHERE id = $1 AND status = 'PENDING'
         RETURNING true AS output",
    )
    .bind(order_id)
}

/// The step that cancels a PENDING order and gives its unit back to stock,
/// together, in one statement (the unit through `return_unit()`): its
/// output is `true`, or null when the order was not pending. Should a
/// provider's success have reached the checkout as its payment window
/// closed (the order's `paid_by`), the same statement records that payment
/// as a refund due (`refund_if_paid()`): it waits on the order row the
/// webhook's transaction locks, so it sees that delivery.
pub fn cancel_order(order_id: i64) -> Statement {
    Statement::new(
        "UPDATE orders SET status = 'CANCELLED', last_update_time = now()
         WHERE id = $1 AND status = 'PENDING'
         RETURNING CASE WHEN refund_if_paid(id, paid_by) THEN return_unit(product_id) END AS output",
    )
    .bind(order_id)
}

/// The step that gives a reserved unit back to stock when its checkout
/// ends before it created its order (`return_unit()`).
pub fn release_unit(product_id: i32) -> Statement {
    Statement::new("SELECT return_unit($1) AS output").bind(product_id)
}

/// One dispatch step: progress down by one; DISPATCHED at zero. Its output
/// is the progress left, or null when the order was not being dispatched.
/// Written for each dispatch taking it (it touches only its own order),
/// so the dispatches a worker runs that come due together share one
/// statement and one commit.
pub fn update_progress(order_id: i64) -> ForEach {
    Statement::for_each(
        "UPDATE orders SET progress_remaining = progress_remaining - 1,
             status = CASE WHEN progress_remaining - 1 = 0 THEN 'DISPATCHED' ELSE status END,
             last_update_time = now()
         FROM input
         WHERE orders.id = (input.arg)::bigint AND orders.status = 'PAID'
             AND orders.progress_remaining > 0
         RETURNING input.workflow_id, orders.progress_remaining AS output",
        order_id,
    )
}

/// One order.
pub async fn order(pool: &PgPool, order_id: i64) -> Result<Option<Order>, sqlx::Error> {
    sqlx::query_as(select_orders!("WHERE id = $1"))
        .bind(order_id)
        .fetch_optional(pool)
        .await
}

/// The order of a checkout.
pub async fn order_of_checkout(
    pool: &PgPool,
    checkout_id: &str,
) -> Result<Option<Order>, sqlx::Error> {
    sqlx::query_as(select_orders!("WHERE checkout_id = $1"))
        .bind(checkout_id)
        .fetch_optional(pool)
        .await
}

/// The newest orders first.
pub async fn recent_orders(pool: &PgPool, limit: i64) -> Result<Vec<Order>, sqlx::Error> {
    sqlx::query_as(select_orders!("ORDER BY created_at DESC, id DESC LIMIT $1"))
        .bind(limit)
        .fetch_all(pool)
        .await
}

/// The shop's health, as metrics report it.
#[derive(Debug, Clone, Default)]
pub struct Health {
    /// Orders by status.
    pub orders: Vec<(String, i64)>,
    /// How long the oldest PENDING order has waited for its payment (seconds).
    pub oldest_pending_secs: f64,
    /// Units in stock.
    pub stock: i64,
    /// Provider deliveries by what the store did with them.
    pub payments: Vec<(String, i64)>,
    /// Refunds owed.
    pub refunds_due: i64,
}

/// Reads the shop's health in one statement.
pub async fn health(pool: &PgPool) -> Result<Health, sqlx::Error> {
    let (orders, oldest, stock, payments, refunds): (Value, f64, i64, Value, i64) = sqlx::query_as(
        "SELECT
             (SELECT coalesce(jsonb_object_agg(status, n), '{}') FROM
                 (SELECT status, count(*) AS n FROM orders GROUP BY status) s),
             (SELECT coalesce(extract(epoch FROM now() - min(created_at))::float8, 0)
                 FROM orders WHERE status = 'PENDING'),
             (SELECT coalesce(sum(inventory), 0)::bigint FROM products),
             (SELECT coalesce(jsonb_object_agg(outcome, n), '{}') FROM
                 (SELECT outcome, count(*) AS n FROM payment_ledger GROUP BY outcome) p),
             (SELECT count(*) FROM refunds_due)",
    )
    .fetch_one(pool)
    .await?;
    let pairs = |v: Value| -> Vec<(String, i64)> {
        v.as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, n)| (k.clone(), n.as_i64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default()
    };
    Ok(Health {
        orders: pairs(orders),
        oldest_pending_secs: oldest,
        stock,
        payments: pairs(payments),
        refunds_due: refunds,
    })
}
