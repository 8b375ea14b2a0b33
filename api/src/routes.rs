//! The HTTP surface (the demo's paths and bodies, plus health and fleet).

use std::net::SocketAddr;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use engine::{Engine, EngineError, Message, SendOutcome, StepRecord, fleet};
use rust_decimal::prelude::ToPrimitive;
use serde::Deserialize;
use serde_json::{Value, json};
use store::{
    self, CHECKOUT, CheckoutInput, DEFAULT_STOCK, DISPATCH, DISPATCH_STEPS, Order, PaymentStatus,
    Product, dispatch_workflow_id, topics,
};

use crate::error::ApiError;
use crate::limits::{self, LimitArgs};
use crate::{AppState, payments};

type ApiResult<T = Response> = Result<T, ApiError>;

/// The routes; the demo's unsigned payment webhook only with `demo_payments`.
pub fn routes(demo_payments: bool, limits: &LimitArgs) -> Router<AppState> {
    let checkout = match limits::checkout_rate_limit(limits) {
        Some(limit) => post(checkout).layer(limit),
        None => post(checkout),
    };
    let router = Router::new()
        .route("/", get(index))
        .route("/product", get(product))
        .route("/orders", get(orders))
        .route("/order/{id}", get(order))
        .route("/order/{id}/timeline", get(order_timeline))
        .route("/restock", post(restock))
        .route("/checkout/{key}", checkout)
        .route("/webhooks/payments", post(payments::provider_webhook))
        .route("/payments/refunds_due", get(payments::refunds_due))
        .route("/crash_application", post(crash_application))
        .route("/workers", get(workers))
        .route("/workers/{id}/crash", post(crash_worker))
        .route("/config", get(config))
        .route("/metrics", get(crate::metrics::scrape))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz));
    if demo_payments {
        router.route(
            "/payment_webhook/{payment_id}/{status}",
            post(payment_webhook),
        )
    } else {
        router
    }
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

/// An order id from the path: a positive integer.
fn parse_order_id(text: &str) -> Result<i64, ApiError> {
    text.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
        ApiError::bad_request("invalid_order_id", "order id must be a positive integer")
    })
}

async fn find_order(state: &AppState, id: &str) -> ApiResult<Order> {
    let id = parse_order_id(id)?;
    store::order(&state.pool, id)
        .await?
        .ok_or_else(|| ApiError::not_found("unknown_order", format!("no order {id}")))
}

async fn order(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    Ok(Json(order_json(&find_order(&state, &id).await?)))
}

/// The order's workflow steps in order: its checkout, then its dispatch,
/// each with the worker that ran it (a takeover after a crash shows as a
/// change of worker) and its checkpoint's output (a dispatch's progress
/// steps read 9, 8, ..., 0 when each was applied once). The checkout's id
/// is the payment id, a bearer secret, so the timeline names workflows by
/// kind only (no step's output holds it).
async fn order_timeline(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let order = find_order(&state, &id).await?;
    let workflows = [
        (CHECKOUT.name, order.checkout_id.clone()),
        (DISPATCH.name, dispatch_workflow_id(order.id)),
    ];
    let mut steps = Vec::new();
    let mut runs = Vec::new();
    for (kind, workflow_id) in &workflows {
        let Some(info) = state.engine.info(workflow_id).await? else {
            continue;
        };
        runs.push(json!({
            "workflow": kind,
            "status": info.status,
            "worker_id": info.owner,
            "executions": info.executions,
        }));
        for step in state.engine.steps(workflow_id).await? {
            let mut step = step_json(&step);
            step["workflow"] = json!(kind);
            steps.push(step);
        }
    }
    let payments = store::payments::ledger_of(&state.pool, &order.checkout_id).await?;
    let mut json = order_json(&order);
    json["workflows"] = Value::Array(runs);
    json["steps"] = Value::Array(steps);
    json["payments"] = json!(payments);
    Ok(Json(json))
}

/// A completed step as timelines show it: the worker that ran it, when,
/// how long, and its checkpoint's output.
pub(crate) fn step_json(step: &StepRecord) -> Value {
    let duration = step.finished_at - step.started_at;
    json!({
        "seq": step.step_seq,
        "name": step.name,
        "output": step.output,
        "worker_id": step.worker_id,
        "started_at": step.started_at,
        "finished_at": step.finished_at,
        "duration_ms": duration.num_microseconds().map(|us| us as f64 / 1000.0),
    })
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
pub(crate) fn valid_key(key: &str) -> bool {
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
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(key): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    if !valid_key(&key) {
        return Err(ApiError::bad_request(
            "invalid_key",
            "key must be 1 to 128 characters of A-Z a-z 0-9 _ - (and not start with \"dispatch-\")",
        ));
    }
    let input = CheckoutInput {
        product_id: store::WIDGET_ID,
        // Kept with the workflow only when it is a sane id.
        request_id: headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|id| id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic()))
            .map(str::to_owned),
        client: limits::client_ip(&headers, Some(peer.ip()), state.limits.forwarded_hops)
            .map(|ip| ip.to_string()),
    };
    let events = state.engine.subscribe();
    // Unflushed: this answers only with the payment id (or out of stock),
    // an event, whose flushed commit makes the start durable too.
    let cap = state.limits.max_pending_checkouts;
    let started = if cap == 0 {
        state.engine.start_unflushed(CHECKOUT, &key, &input).await?
    } else {
        store::holds::start_checkout(&state.pool, &key, &input, cap)
            .await?
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_pending_checkouts",
                    format!(
                        "this client holds {cap} checkouts waiting for payment; pay or let one expire first"
                    ),
                )
            })?
    };
    // A checkout this call started cannot have its payment id yet: wait
    // for the notification without reading first.
    let payment_id = if started.created {
        events
            .next(&key, topics::PAYMENT_ID, state.event_wait)
            .await?
    } else {
        events
            .get(&key, topics::PAYMENT_ID, state.event_wait)
            .await?
    };
    match payment_id {
        None => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "payment_id_not_ready",
            "the checkout did not produce a payment id in time; retry with the same key",
        )),
        Some(Value::Null) => Err(ApiError::conflict("out_of_stock", "item not available")),
        // Ended (cancelled by an operator, or failed) before its order.
        Some(Value::Object(ended)) => Err(ApiError::conflict(
            "checkout_ended",
            format!(
                "this checkout {} before it created an order; nothing is reserved; use a new key",
                ended
                    .get("ended")
                    .and_then(Value::as_str)
                    .unwrap_or("ended")
            ),
        )),
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
    // Every workflow a valid payment id can name is a checkout (dispatch
    // ids are not valid payment ids), so the send itself tells an unknown
    // payment id.
    let events = engine.subscribe();
    // Unflushed: this answers from the settlement's events, whose flushed
    // commit makes the message durable too, or from what a crash cannot
    // take back (no such checkout; a finished one).
    let sent = engine
        .send_unflushed(Message {
            workflow_id: &payment_id,
            topic: topics::PAYMENT_STATUS,
            payload: json!(status.as_str()),
            key: Some(topics::PAYMENT_STATUS),
        })
        .await;
    // The checkout sets the order id and the payment's outcome together,
    // after taking this payment status: wait for both notifications
    // without reading first.
    let settled = [topics::ORDER_ID, topics::PAYMENT_OUTCOME];
    let settlement = match sent {
        Ok(SendOutcome::Delivered) => {
            events
                .next_all(&payment_id, settled, state.event_wait)
                .await?
        }
        // A status was taken before, this one or the other: answer from
        // the settlement, not from that message, which another webhook may
        // have sent unflushed a moment ago.
        Ok(SendOutcome::Duplicate { .. }) => {
            events
                .get_all(&payment_id, settled, state.event_wait)
                .await?
        }
        Err(EngineError::UnknownWorkflow(_)) => {
            return Err(ApiError::not_found("unknown_payment", "no such payment id"));
        }
        Err(EngineError::Finished { .. }) => {
            return Err(settled_otherwise(engine, &payment_id).await);
        }
        Err(e) => return Err(e.into()),
    };
    let Some([order_id, outcome]) = settlement else {
        return Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "order_not_ready",
            "the order is not settled yet; retry with the same status",
        ));
    };
    if outcome == json!(status.as_str()) {
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
    // A checkout that found no stock handed out no payment id to pay.
    match engine.event(payment_id, topics::PAYMENT_ID).await {
        Ok(Some(Value::Null)) => {
            return ApiError::conflict(
                "out_of_stock",
                "this checkout found no stock; nothing to pay",
            );
        }
        Ok(_) => {}
        Err(e) => return e.into(),
    }
    match engine.event(payment_id, topics::PAYMENT_OUTCOME).await {
        Ok(Some(outcome)) if outcome == json!("timed_out") => ApiError::conflict(
            "checkout_expired",
            "the checkout was cancelled when its payment window closed",
        ),
        Ok(Some(outcome)) if outcome == json!("cancelled") || outcome == json!("failed") => {
            ApiError::conflict(
                "checkout_ended",
                "the checkout was cancelled by an operator or failed; its order is cancelled",
            )
        }
        Ok(_) => payment_conflict(),
        Err(e) => e.into(),
    }
}

fn require_chaos(state: &AppState) -> Result<(), ApiError> {
    if state.chaos {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "chaos_disabled",
            "crashing workers is disabled; start the API and workers with --chaos (CHAOS=true)",
        ))
    }
}

/// 202 with the id of the worker told to crash.
fn crash_requested(headers: &HeaderMap, worker_id: String) -> Response {
    text_or_json(headers, StatusCode::ACCEPTED, "worker_id", json!(worker_id))
}

async fn crash_application(State(state): State<AppState>, headers: HeaderMap) -> ApiResult {
    require_chaos(&state)?;
    match store::chaos::request_crash(&state.pool, None).await? {
        Some(worker_id) => Ok(crash_requested(&headers, worker_id)),
        None => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_workers",
            "no live worker to crash",
        )),
    }
}

/// A worker id as the fleet registry makes them (`w-<hex>`), or one of an
/// older build.
fn valid_worker_id(id: &str) -> bool {
    (1..=255).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

async fn crash_worker(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    require_chaos(&state)?;
    if !valid_worker_id(&id) {
        return Err(ApiError::bad_request(
            "invalid_worker_id",
            "malformed worker id",
        ));
    }
    match store::chaos::request_crash(&state.pool, Some(&id)).await? {
        Some(worker_id) => Ok(crash_requested(&headers, worker_id)),
        None => Err(ApiError::not_found(
            "unknown_worker",
            "no live worker with this id (it may have exited already)",
        )),
    }
}

/// The fleet as anyone may see it: no host or process id (the admin API
/// has those).
async fn workers(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    let workers: Vec<Value> = fleet::list_workers(&state.pool)
        .await?
        .into_iter()
        .map(|w| {
            json!({
                "id": w.id,
                "queues": w.queues,
                "started_at": w.started_at,
                "last_seen": w.last_seen,
                "in_flight": w.in_flight,
                "draining": w.draining,
            })
        })
        .collect();
    Ok(Json(Value::Array(workers)))
}

/// What the storefront page needs to know about this deployment.
async fn config(State(state): State<AppState>) -> Json<Value> {
    Json(json!({
        "chaos": state.chaos,
        "dispatch_steps": DISPATCH_STEPS,
        "demo_payments": state.demo_payments,
    }))
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<AppState>) -> ApiResult<&'static str> {
    if !store::db::migrations_applied(&state.pool).await? {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "migrations_pending",
            "database migrations are not applied yet",
        ));
    }
    Ok("ready")
}
