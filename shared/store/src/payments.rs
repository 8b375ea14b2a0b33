//! Payments a provider reports through its signed webhook: the ledger of
//! every verified delivery, what the store did with each, and the refunds
//! it owes. Verifying the signature is the API's job; this module takes a
//! delivery already verified.
//!
//! One delivery is recorded in one transaction, serialized per delivery id
//! and per order, that writes its ledger row and, when it settles a pending
//! order, hands the payment status to the order's checkout (an engine
//! message): both or neither. A delivery id seen before gets the answer it
//! got the first time and changes nothing.

use chrono::{DateTime, Utc};
use engine::{Engine, EngineError, Message, SendOutcome};
use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool};

use crate::{PaymentStatus, topics};

/// The currency every price is in.
pub const CURRENCY: &str = "USD";

/// What a provider says happened to a payment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentEventType {
    /// `payment.succeeded`: the money was taken.
    Succeeded,
    /// `payment.failed`.
    Failed,
}

impl PaymentEventType {
    /// Parses the provider's `type`.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "payment.succeeded" => Some(Self::Succeeded),
            "payment.failed" => Some(Self::Failed),
            _ => None,
        }
    }

    /// The provider's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "payment.succeeded",
            Self::Failed => "payment.failed",
        }
    }

    fn status(self) -> PaymentStatus {
        match self {
            Self::Succeeded => PaymentStatus::Paid,
            Self::Failed => PaymentStatus::Failed,
        }
    }
}

/// A verified provider delivery.
#[derive(Debug, Clone)]
pub struct ProviderEvent {
    /// `webhook-id`: the same for every retry of one delivery.
    pub delivery_id: String,
    /// What happened.
    pub kind: PaymentEventType,
    /// The payment id the store handed the shopper (the checkout's id).
    pub payment_id: String,
    /// The amount taken, in `currency`.
    pub amount: Decimal,
    /// ISO 4217 code.
    pub currency: String,
}

/// The answer a delivery got: sent again, unchanged, for a redelivery.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    /// HTTP status.
    pub status: u16,
    /// JSON body.
    pub answer: Value,
}

/// What the store did with a delivery (`payment_ledger.outcome`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Handed to the order's pending checkout.
    Applied,
    /// Money taken for no goods: owed back.
    RefundDue,
    /// A failure for an order already settled: nothing to do.
    Ignored,
    /// Amount or currency not the order's: refused, never applied.
    Mismatch,
    /// No order has this payment id.
    UnknownPayment,
}

/// The answer to a delivery that was recorded and not refused.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeliveryAnswer {
    /// The delivery's `webhook-id`.
    pub delivery_id: String,
    /// What the store did with it.
    pub outcome: Outcome,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::RefundDue => "refund_due",
            Self::Ignored => "ignored",
            Self::Mismatch => "mismatch",
            Self::UnknownPayment => "unknown_payment",
        }
    }
}

/// The order a payment id names, locked for this delivery.
#[derive(sqlx::FromRow)]
struct PayableOrder {
    id: i64,
    status: String,
    paid_by: Option<String>,
    price: Decimal,
}

/// Records a verified delivery and acts on it, exactly once per delivery
/// id however many times and however concurrently it arrives.
pub async fn record(pool: &PgPool, event: &ProviderEvent) -> Result<Recorded, EngineError> {
    let mut tx = pool.begin().await?;
    // Deliveries of one id queue here; the first commits its ledger row.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('payment-delivery:' || $1, 0))")
        .bind(&event.delivery_id)
        .execute(&mut *tx)
        .await?;
    let seen: Option<(i32, Value)> =
        sqlx::query_as("SELECT answer_status, answer FROM payment_ledger WHERE delivery_id = $1")
            .bind(&event.delivery_id)
            .fetch_optional(&mut *tx)
            .await?;
    if let Some((status, answer)) = seen {
        tx.rollback().await?;
        return Ok(Recorded {
            status: status as u16,
            answer,
        });
    }
    let order: Option<PayableOrder> = sqlx::query_as(
        "SELECT o.id, o.status, o.paid_by, p.price
         FROM orders o JOIN products p ON p.id = o.product_id
         WHERE o.checkout_id = $1 FOR UPDATE OF o",
    )
    .bind(&event.payment_id)
    .fetch_optional(&mut *tx)
    .await?;
    let outcome = decide(&mut tx, event, order.as_ref()).await?;
    let order_id = order.as_ref().map(|o| o.id);
    let (status, answer) = match outcome {
        Outcome::Mismatch => (
            422,
            json!({ "error": {
                "code": "payment_mismatch",
                "message": "the amount or currency is not the order's; recorded, not applied",
            }}),
        ),
        _ => (
            200,
            serde_json::to_value(DeliveryAnswer {
                delivery_id: event.delivery_id.clone(),
                outcome,
            })?,
        ),
    };
    sqlx::query(
        "INSERT INTO payment_ledger
             (delivery_id, payment_id, type, amount, currency, outcome, order_id, answer_status, answer)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(&event.delivery_id)
    .bind(&event.payment_id)
    .bind(event.kind.as_str())
    .bind(event.amount)
    .bind(&event.currency)
    .bind(outcome.as_str())
    .bind(order_id)
    .bind(status)
    .bind(&answer)
    .execute(&mut *tx)
    .await?;
    if outcome == Outcome::RefundDue {
        let reason = match &order {
            None => "no_order",
            Some(o) if o.status == "CANCELLED" => "checkout_cancelled",
            Some(o) if o.paid_by.is_some() => "paid_twice",
            Some(_) => "settled_otherwise",
        };
        sqlx::query(
            "INSERT INTO refunds_due (delivery_id, payment_id, order_id, amount, currency, reason)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&event.delivery_id)
        .bind(&event.payment_id)
        .bind(order_id)
        .bind(event.amount)
        .bind(&event.currency)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(Recorded {
        status: status as u16,
        answer,
    })
}

/// What to do with a delivery for `order` (locked), handing it to the
/// order's checkout when it settles a pending order.
async fn decide(
    tx: &mut PgConnection,
    event: &ProviderEvent,
    order: Option<&PayableOrder>,
) -> Result<Outcome, EngineError> {
    let succeeded = event.kind == PaymentEventType::Succeeded;
    let Some(order) = order else {
        return Ok(if succeeded {
            Outcome::RefundDue
        } else {
            Outcome::UnknownPayment
        });
    };
    if event.amount != order.price || event.currency != CURRENCY {
        return Ok(Outcome::Mismatch);
    }
    let pending = order.status == "PENDING" && order.paid_by.is_none();
    if !pending {
        return Ok(if succeeded {
            Outcome::RefundDue
        } else {
            Outcome::Ignored
        });
    }
    let sent = Engine::send_in(
        tx,
        Message {
            workflow_id: &event.payment_id,
            topic: topics::PAYMENT_STATUS,
            payload: json!(event.kind.status().as_str()),
            key: Some(topics::PAYMENT_STATUS),
        },
    )
    .await;
    match sent {
        Ok(SendOutcome::Delivered) => {}
        // The checkout took a status already (a failure before this
        // success), or has finished: this delivery does not settle it.
        Ok(SendOutcome::Duplicate { .. }) | Err(EngineError::Finished { .. }) => {
            return Ok(if succeeded {
                Outcome::RefundDue
            } else {
                Outcome::Ignored
            });
        }
        Err(e) => return Err(e),
    }
    if succeeded {
        // Should the checkout cancel the order all the same (its payment
        // window closed as this arrived), the cancel owes this payment back.
        sqlx::query("UPDATE orders SET paid_by = $2 WHERE id = $1")
            .bind(order.id)
            .bind(&event.delivery_id)
            .execute(&mut *tx)
            .await?;
    }
    Ok(Outcome::Applied)
}

/// A ledger row, as operators and the order's timeline see it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LedgerEntry {
    /// The delivery's id.
    pub delivery_id: String,
    /// `payment.succeeded` or `payment.failed`.
    #[sqlx(rename = "type")]
    #[serde(rename = "type")]
    pub kind: String,
    /// Amount as delivered.
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "9.99"))]
    pub amount: Decimal,
    /// Currency as delivered.
    pub currency: String,
    /// When it was recorded.
    pub received_at: DateTime<Utc>,
    /// What the store did with it.
    pub outcome: String,
}

/// The deliveries for one payment id, oldest first.
pub async fn ledger_of(pool: &PgPool, payment_id: &str) -> Result<Vec<LedgerEntry>, sqlx::Error> {
    sqlx::query_as(
        "SELECT delivery_id, type, amount, currency, received_at, outcome
         FROM payment_ledger WHERE payment_id = $1 ORDER BY received_at, delivery_id",
    )
    .bind(payment_id)
    .fetch_all(pool)
    .await
}

/// Money taken for no goods, owed back.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RefundDue {
    /// The delivery that took the money.
    pub delivery_id: String,
    /// The payment id.
    pub payment_id: String,
    /// The order, if there is one.
    pub order_id: Option<i64>,
    /// Amount to refund.
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "9.99"))]
    pub amount: Decimal,
    /// Its currency.
    pub currency: String,
    /// Why: `checkout_cancelled`, `paid_twice`, `settled_otherwise`, `no_order`.
    pub reason: String,
    /// When it was recorded.
    pub created_at: DateTime<Utc>,
}

/// The refunds due, newest first.
pub async fn refunds_due(pool: &PgPool, limit: i64) -> Result<Vec<RefundDue>, sqlx::Error> {
    sqlx::query_as(
        "SELECT delivery_id, payment_id, order_id, amount, currency, reason, created_at
         FROM refunds_due ORDER BY created_at DESC, id DESC LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await
}
