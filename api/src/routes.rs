//! The HTTP surface (the demo's paths and bodies, plus health and fleet).

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use rust_decimal::prelude::ToPrimitive;
use serde::Deserialize;
use serde_json::{Value, json};
use shared::engine::{Engine, EngineError, Message, SendOutcome, fleet};
use shared::store::{
    self, CHECKOUT, CheckoutInput, DEFAULT_STOCK, Order, PaymentStatus, Product, topics,
};

use crate::AppState;
use crate::error::ApiError;

type ApiResult<T = Response> = Result<T, ApiError>;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(index))
        .route("/product", get(product))
        .route("/orders", get(orders))
        .route("/order/{id}", get(order))
        .route("/restock", post(restock))
        .route("/checkout/{key}", post(checkout))
        .route(
            "/payment_webhook/{payment_id}/{status}",
            post(payment_webhook),
        )
        .route("/crash_application", post(crash_application))
        .route("/workers", get(workers))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

/// Largest `limit` of `GET /orders`.
pub const ORDERS_LIMIT_MAX: i64 = 500;
const ORDERS_LIMIT_DEFAULT: i64 = 50;
/// Largest stock `POST /restock` accepts.
pub const RESTOCK_MAX: i32 = 1_000_000;

async fn index() -> Html<&'static str> {
    Html(include_str!("index.html"))
}

fn product_json(p: &Product) -> Value {
    json!({
        "product_id": p.id,
        "product": p.name,
        "description": p.description,
        "inventory": p.inventory,
        "price": p.price.to_f64(),
    })
}

fn order_json(o: &Order) -> Value {
    let status = o.order_status();
    json!({
        "order_id": o.id,
        "order_status": status.demo_code(),
        "status": status.as_str(),
        "last_update_time": o.last_update_time,
        "progress_remaining": o.progress_remaining,
    })
}

async fn product(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    Ok(Json(product_json(&store::product(&state.pool).await?)))
}

#[derive(Deserialize)]
struct OrdersQuery {
    limit: Option<String>,
}

async fn orders(
    State(state): State<AppState>,
    Query(query): Query<OrdersQuery>,
) -> ApiResult<Json<Value>> {
    let limit = match query.limit.as_deref() {
        None => ORDERS_LIMIT_DEFAULT,
        Some(text) => match text.parse::<i64>() {
            Ok(n) if (1..=ORDERS_LIMIT_MAX).contains(&n) => n,
            _ => {
                return Err(ApiError::bad_request(
                    "invalid_limit",
                    format!("limit must be an integer from 1 to {ORDERS_LIMIT_MAX}"),
                ));
            }
        },
    };
    let orders = store::recent_orders(&state.pool, limit).await?;
    Ok(Json(Value::Array(orders.iter().map(order_json).collect())))
}

async fn order(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let id: i64 = id.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
        ApiError::bad_request("invalid_order_id", "order id must be a positive integer")
    })?;
    match store::order(&state.pool, id).await? {
        Some(order) => Ok(Json(order_json(&order))),
        None => Err(ApiError::not_found(
            "unknown_order",
            format!("no order {id}"),
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RestockBody {
    inventory: i64,
}

async fn restock(State(state): State<AppState>, body: Bytes) -> ApiResult<Json<Value>> {
    let inventory = if body.iter().all(u8::is_ascii_whitespace) {
        DEFAULT_STOCK
    } else {
        let parsed: RestockBody = serde_json::from_slice(&body).map_err(|_| {
            ApiError::bad_request(
                "invalid_body",
                "body must be empty or {\"inventory\": <integer>}",
            )
        })?;
        i32::try_from(parsed.inventory)
            .ok()
            .filter(|n| (0..=RESTOCK_MAX).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_inventory",
                    format!("inventory must be from 0 to {RESTOCK_MAX}"),
                )
            })?
    };
    Ok(Json(product_json(
        &store::restock(&state.pool, inventory).await?,
    )))
}

/// A checkout key: 1 to 128 of `[A-Za-z0-9_-]`, not starting with the
/// dispatch workflows' reserved prefix.
fn valid_key(key: &str) -> bool {
    (1..=128).contains(&key.len())
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        && !key.starts_with("dispatch-")
}

fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/json"))
}

/// Plain text by default (the demo's body), JSON on request.
fn text_or_json(headers: &HeaderMap, status: StatusCode, field: &str, value: Value) -> Response {
    if wants_json(headers) {
        (status, Json(json!({ field: value }))).into_response()
    } else {
        let text = match &value {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        (
            status,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            text,
        )
            .into_response()
    }
}

async fn checkout(
    State(state): State<AppState>,
    Path(key): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    if !valid_key(&key) {
        return Err(ApiError::bad_request(
            "invalid_key",
            "key must be 1 to 128 characters of A-Z a-z 0-9 _ - (and not start with \"dispatch-\")",
        ));
    }
    state
        .engine
        .start(
            CHECKOUT,
            &key,
            &CheckoutInput {
                product_id: store::WIDGET_ID,
            },
        )
        .await?;
    match state
        .engine
        .get_event(&key, topics::PAYMENT_ID, state.event_wait)
        .await?
    {
        None => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "payment_id_not_ready",
            "the checkout did not produce a payment id in time; retry with the same key",
        )),
        Some(Value::Null) => Err(ApiError::conflict("out_of_stock", "item not available")),
        Some(payment_id) => Ok(text_or_json(
            &headers,
            StatusCode::OK,
            "payment_id",
            payment_id,
        )),
    }
}

async fn payment_webhook(
    State(state): State<AppState>,
    Path((payment_id, status)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult {
    let Some(status) = PaymentStatus::parse(&status) else {
        return Err(ApiError::bad_request(
            "invalid_status",
            "status must be paid or failed",
        ));
    };
    if !valid_key(&payment_id) {
        return Err(ApiError::bad_request(
            "invalid_payment_id",
            "malformed payment id",
        ));
    }
    let engine = &state.engine;
    // A payment id handed out is a checkout's PAYMENT_ID event: one read
    // settles the usual case; the workflow row only for the rest.
    match engine.event(&payment_id, topics::PAYMENT_ID).await? {
        Some(Value::Null) => {
            return Err(ApiError::conflict(
                "out_of_stock",
                "this checkout found no stock; nothing to pay",
            ));
        }
        Some(_) => {}
        None => match engine.info(&payment_id).await? {
            Some(info) if info.kind == CHECKOUT.name => {}
            _ => return Err(ApiError::not_found("unknown_payment", "no such payment id")),
        },
    }
    let sent = engine
        .send(Message {
            workflow_id: &payment_id,
            topic: topics::PAYMENT_STATUS,
            payload: json!(status.as_str()),
            key: Some(topics::PAYMENT_STATUS),
        })
        .await;
    match sent {
        Ok(SendOutcome::Delivered) => {}
        Ok(SendOutcome::Duplicate { payload }) if payload == json!(status.as_str()) => {}
        Ok(SendOutcome::Duplicate { .. }) => return Err(payment_conflict()),
        Err(EngineError::Finished { .. }) => {
            return Err(settled_otherwise(engine, &payment_id).await);
        }
        Err(e) => return Err(e.into()),
    }
    let Some(order_id) = engine
        .get_event(&payment_id, topics::ORDER_ID, state.event_wait)
        .await?
    else {
        return Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "order_not_ready",
            "the payment was recorded but the order is not settled yet; retry",
        ));
    };
    let outcome = engine.event(&payment_id, topics::PAYMENT_OUTCOME).await?;
    if outcome == Some(json!(status.as_str())) {
        Ok(text_or_json(&headers, StatusCode::OK, "order_id", order_id))
    } else {
        Err(settled_otherwise(engine, &payment_id).await)
    }
}

fn payment_conflict() -> ApiError {
    ApiError::conflict(
        "payment_conflict",
        "this payment was already settled with the other status",
    )
}

/// The error for a webhook that arrives after the checkout settled some
/// other way.
async fn settled_otherwise(engine: &Engine, payment_id: &str) -> ApiError {
    match engine.event(payment_id, topics::PAYMENT_OUTCOME).await {
        Ok(Some(outcome)) if outcome == json!("timed_out") => ApiError::conflict(
            "checkout_expired",
            "the checkout was cancelled when its payment window closed",
        ),
        Ok(_) => payment_conflict(),
        Err(e) => e.into(),
    }
}

async fn crash_application(State(state): State<AppState>, headers: HeaderMap) -> ApiResult {
    if !state.chaos {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "chaos_disabled",
            "crashing workers is disabled; start the API and workers with --chaos (CHAOS=true)",
        ));
    }
    match fleet::request_crash(&state.pool, None).await? {
        Some(worker_id) => Ok(text_or_json(
            &headers,
            StatusCode::ACCEPTED,
            "worker_id",
            json!(worker_id),
        )),
        None => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_workers",
            "no live worker to crash",
        )),
    }
}

async fn workers(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    let workers = fleet::list_workers(&state.pool).await?;
    Ok(Json(json!(workers)))
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<AppState>) -> ApiResult<&'static str> {
    let applied: Option<i64> =
        sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
            .fetch_one(&state.pool)
            .await?;
    let latest = shared::db::MIGRATOR.iter().map(|m| m.version).max();
    if applied < latest {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "migrations_pending",
            "database migrations are not applied yet",
        ));
    }
    Ok("ready")
}
