//! The payment provider's signed webhook and the refunds it leaves owed.

use std::str::FromStr;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use rust_decimal::Decimal;
use serde::Deserialize;
use store::payments::{self, DeliveryAnswer, PaymentEventType, ProviderEvent, RefundDue};
use utoipa::{IntoParams, ToSchema};

use crate::views::ErrorBody;

use crate::AppState;
use crate::error::ApiError;
use crate::signature::{self, Refused};

/// Longest `webhook-id` accepted.
const DELIVERY_ID_MAX: usize = 256;
/// Largest `limit` of `GET /payments/refunds_due`.
pub const REFUNDS_LIMIT_MAX: i64 = 500;

/// A provider's event.
#[derive(Deserialize, ToSchema)]
pub struct ProviderBody {
    /// `payment.succeeded` or `payment.failed`.
    #[serde(rename = "type")]
    kind: String,
    /// What it is about.
    data: ProviderData,
}

/// The payment an event is about.
#[derive(Deserialize, ToSchema)]
pub struct ProviderData {
    /// The checkout's payment id.
    payment_id: String,
    /// A decimal string such as "9.99".
    amount: String,
    /// An ISO 4217 code such as USD.
    currency: String,
}

/// `POST /webhooks/payments`: a provider's signed payment event. Answers
/// once the delivery is durably recorded (and, when it settles a pending
/// order, handed to its checkout), without waiting for the settlement.
/// A payment provider's event, signed as Standard Webhooks say; answered
/// once durably recorded (a redelivery gets its first answer again).
#[utoipa::path(post, path = "/webhooks/payments", tag = "payments",
    params(("webhook-id" = String, Header, description = "The delivery's id"),
        ("webhook-timestamp" = String, Header, description = "Unix seconds"),
        ("webhook-signature" = String, Header, description = "Space-separated v1,<base64 HMAC-SHA256>")),
    request_body(content = ProviderBody, content_type = "application/json"),
    responses(
        (status = 200, description = "OK", body = DeliveryAnswer),
        (status = 400, description = "invalid_body, invalid_event_type, invalid_payment_id, invalid_amount, invalid_currency, invalid_delivery_id", body = ErrorBody),
        (status = 401, description = "invalid_signature, stale_timestamp", body = ErrorBody),
        (status = 422, description = "payment_mismatch: recorded, not applied", body = ErrorBody),
        (status = 503, description = "webhooks_not_configured, database unavailable", body = ErrorBody)))]
pub async fn provider_webhook(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    if state.webhook_secrets.is_empty() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "webhooks_not_configured",
            "no webhook secret is configured (PAYMENT_WEBHOOK_SECRETS)",
        ));
    }
    let now = chrono::Utc::now().timestamp();
    let delivery_id =
        signature::verify(&state.webhook_secrets, &headers, &body, now).map_err(|refused| {
            match refused {
                Refused::Stale => ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "stale_timestamp",
                    "webhook-timestamp is more than 5 minutes from now",
                ),
                Refused::Malformed(header) => ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "invalid_signature",
                    format!("missing or malformed {header} header"),
                ),
                Refused::Mismatch => ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "invalid_signature",
                    "no signature matches",
                ),
            }
        })?;
    let event = parse_event(delivery_id, &body)?;
    let recorded = payments::record(&state.pool, &event).await?;
    if recorded.status >= 400 {
        tracing::warn!(
            delivery_id = event.delivery_id,
            status = recorded.status,
            "a payment delivery was refused"
        );
    }
    let status = StatusCode::from_u16(recorded.status).map_err(ApiError::internal)?;
    Ok((status, Json(recorded.answer)).into_response())
}

fn parse_event(delivery_id: &str, body: &[u8]) -> Result<ProviderEvent, ApiError> {
    let invalid = |code, message: &str| ApiError::bad_request(code, message.to_owned());
    if delivery_id.len() > DELIVERY_ID_MAX {
        return Err(invalid(
            "invalid_delivery_id",
            "webhook-id is longer than 256 bytes",
        ));
    }
    let body: ProviderBody = serde_json::from_slice(body).map_err(|_| {
        invalid(
            "invalid_body",
            r#"expected {"type": "payment.succeeded" | "payment.failed", "data": {"payment_id", "amount", "currency"}}"#,
        )
    })?;
    let kind = PaymentEventType::parse(&body.kind).ok_or_else(|| {
        invalid(
            "invalid_event_type",
            "type must be payment.succeeded or payment.failed",
        )
    })?;
    let data = body.data;
    if !crate::routes::valid_key(&data.payment_id) {
        return Err(invalid("invalid_payment_id", "malformed payment id"));
    }
    let amount = Decimal::from_str(&data.amount)
        .ok()
        .filter(|a| !a.is_sign_negative() && a.scale() <= 2 && data.amount.len() <= 16)
        .ok_or_else(|| {
            invalid(
                "invalid_amount",
                "amount must be a decimal string such as \"99.99\"",
            )
        })?;
    let currency_ok =
        data.currency.len() == 3 && data.currency.bytes().all(|b| b.is_ascii_uppercase());
    if !currency_ok {
        return Err(invalid(
            "invalid_currency",
            "currency must be an ISO 4217 code such as USD",
        ));
    }
    Ok(ProviderEvent {
        delivery_id: delivery_id.to_owned(),
        kind,
        payment_id: data.payment_id,
        amount,
        currency: data.currency,
    })
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct RefundsQuery {
    /// How many, 1 to 500 (default 100).
    limit: Option<String>,
}

/// `GET /payments/refunds_due`: money taken for no goods, newest first.
#[utoipa::path(get, path = "/payments/refunds_due", tag = "payments", params(RefundsQuery),
    responses((status = 200, description = "OK", body = Vec<RefundDue>), (status = 400, description = "invalid_limit", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody)))]
pub async fn refunds_due(
    State(state): State<AppState>,
    Query(query): Query<RefundsQuery>,
) -> Result<Json<Vec<RefundDue>>, ApiError> {
    let limit = match query.limit {
        None => 100,
        Some(text) => text
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=REFUNDS_LIMIT_MAX).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_limit",
                    format!("limit must be 1 to {REFUNDS_LIMIT_MAX}"),
                )
            })?,
    };
    Ok(Json(payments::refunds_due(&state.pool, limit).await?))
}
