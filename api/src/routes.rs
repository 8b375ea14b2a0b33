//! The HTTP surface (the demo's paths and bodies, plus health and fleet).

use std::net::SocketAddr;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use engine::{Engine, EngineError, Message, SendOutcome, fleet};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use store::{
    self, CHECKOUT, CheckoutInput, DEFAULT_STOCK, DISPATCH, DISPATCH_STEPS, Order, PaymentStatus,
    dispatch_workflow_id, topics,
};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::error::ApiError;
use crate::limits::{self, LimitArgs};
use crate::views::{
    ConfigView, ErrorBody, OrderIdBody, OrderView, PaymentIdBody, ProductView, PublicWorker,
    StepView, TimelineRun, TimelineView, WorkerIdBody,
};
use crate::{AppState, payments};

type ApiResult<T = Response> = Result<T, ApiError>;

/// The routes, each with its OpenAPI description; the demo's unsigned
/// payment webhook only with `demo_payments`.
pub fn routes(demo_payments: bool, limits: &LimitArgs) -> OpenApiRouter<AppState> {
    let (schemas, paths, checkout) = routes!(checkout);
    let checkout = match limits::checkout_rate_limit(limits) {
        Some(limit) => checkout.layer(limit),
        None => checkout,
    };
    let router = OpenApiRouter::new()
        .routes(routes!(index))
        .routes(routes!(product))
        .routes(routes!(orders))
        .routes(routes!(order))
        .routes(routes!(order_timeline))
        .routes(routes!(restock))
        .routes((schemas, paths, checkout))
        .routes(routes!(payments::provider_webhook))
        .routes(routes!(payments::refunds_due))
        .routes(routes!(crash_application))
        .routes(routes!(workers))
        .routes(routes!(crash_worker))
        .routes(routes!(config))
        .routes(routes!(crate::metrics::scrape))
        .routes(routes!(healthz))
        .routes(routes!(readyz));
    if demo_payments {
        router.routes(routes!(payment_webhook))
    } else {
        router
    }
}

/// Largest `limit` of `GET /orders`.
pub const ORDERS_LIMIT_MAX: i64 = 500;
const ORDERS_LIMIT_DEFAULT: i64 = 50;
/// Largest stock `POST /restock` accepts.
pub const RESTOCK_MAX: i32 = 1_000_000;

/// The storefront page.
#[utoipa::path(get, path = "/", tag = "shop",
    responses((status = 200, description = "The storefront page", content_type = "text/html", body = String)))]
async fn index() -> Html<&'static str> {
    Html(include_str!("index.html"))
}

/// The product and its stock.
#[utoipa::path(get, path = "/product", tag = "shop",
    responses((status = 200, description = "OK", body = ProductView), (status = 503, description = "Database unavailable", body = ErrorBody)))]
async fn product(State(state): State<AppState>) -> ApiResult<Json<ProductView>> {
    Ok(Json((&store::product(&state.pool).await?).into()))
}

#[derive(Deserialize, IntoParams)]
struct OrdersQuery {
    /// How many, 1 to 500 (default 50).
    limit: Option<String>,
}

/// The newest orders.
#[utoipa::path(get, path = "/orders", tag = "shop", params(OrdersQuery),
    responses((status = 200, description = "OK", body = Vec<OrderView>), (status = 400, description = "invalid_limit", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody)))]
async fn orders(
    State(state): State<AppState>,
    Query(query): Query<OrdersQuery>,
) -> ApiResult<Json<Vec<OrderView>>> {
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
    Ok(Json(orders.iter().map(OrderView::from).collect()))
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

/// One order.
#[utoipa::path(get, path = "/order/{id}", tag = "shop",
    params(("id" = String, Path, description = "The order's id, a positive integer")),
    responses((status = 200, description = "OK", body = OrderView), (status = 400, description = "invalid_order_id", body = ErrorBody),
        (status = 404, description = "unknown_order", body = ErrorBody), (status = 503, description = "Database unavailable", body = ErrorBody)))]
async fn order(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<OrderView>> {
    Ok(Json((&find_order(&state, &id).await?).into()))
}

/// The order's workflow steps in order: its checkout, then its dispatch,
/// each with the worker that ran it (a takeover after a crash shows as a
/// change of worker) and its checkpoint's output (a dispatch's progress
/// steps read 9, 8, ..., 0 when each was applied once). The checkout's id
/// is the payment id, a bearer secret, so the timeline names workflows by
/// kind only (no step's output holds it).
#[utoipa::path(get, path = "/order/{id}/timeline", tag = "shop",
    params(("id" = String, Path, description = "The order's id, a positive integer")),
    responses((status = 200, description = "OK", body = TimelineView), (status = 400, description = "invalid_order_id", body = ErrorBody),
        (status = 404, description = "unknown_order", body = ErrorBody), (status = 503, description = "Database unavailable", body = ErrorBody)))]
async fn order_timeline(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<TimelineView>> {
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
        runs.push(TimelineRun {
            workflow: (*kind).to_owned(),
            status: info.status,
            worker_id: info.owner,
            executions: info.executions,
        });
        for step in state.engine.steps(workflow_id).await? {
            steps.push(StepView::of(&step, Some(kind)));
        }
    }
    Ok(Json(TimelineView {
        order: (&order).into(),
        workflows: runs,
        steps,
        payments: store::payments::ledger_of(&state.pool, &order.checkout_id).await?,
    }))
}

/// `POST /restock`'s body (none: back to 100).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct RestockBody {
    /// The new stock, 0 to 1,000,000.
    inventory: i64,
}

/// Sets the stock: to 100 with no body.
#[utoipa::path(post, path = "/restock", tag = "shop",
    request_body(content = Option<RestockBody>, description = "Empty, or the new stock"),
    responses((status = 200, description = "OK", body = ProductView), (status = 400, description = "invalid_body, invalid_inventory", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody)))]
async fn restock(State(state): State<AppState>, body: Bytes) -> ApiResult<Json<ProductView>> {
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
    Ok(Json(
        (&store::restock(&state.pool, inventory).await?).into(),
    ))
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

/// Plain text by default (the demo's body), `body` as JSON on request.
fn text_or_json(
    headers: &HeaderMap,
    status: StatusCode,
    text: String,
    body: impl Serialize,
) -> Response {
    if wants_json(headers) {
        (status, Json(body)).into_response()
    } else {
        (
            status,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            text,
        )
            .into_response()
    }
}

/// Starts a checkout (idempotent per key): reserves a unit, creates the
/// order, answers its payment id.
#[utoipa::path(post, path = "/checkout/{key}", tag = "shop",
    params(("key" = String, Path, description = "Idempotency key: 1 to 128 of A-Z a-z 0-9 _ -, not starting dispatch-")),
    responses(
        (status = 200, description = "The payment id", content((String = "text/plain"), (PaymentIdBody = "application/json"))),
        (status = 400, description = "invalid_key", body = ErrorBody),
        (status = 409, description = "out_of_stock, checkout_ended", body = ErrorBody),
        (status = 429, description = "rate_limited (with Retry-After), too_many_pending_checkouts", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
        (status = 504, description = "payment_id_not_ready: retry with the same key", body = ErrorBody)))]
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
        Some(Value::String(payment_id)) => Ok(text_or_json(
            &headers,
            StatusCode::OK,
            payment_id.clone(),
            PaymentIdBody { payment_id },
        )),
        Some(other) => Err(ApiError::internal(format!(
            "the payment id event holds {other}"
        ))),
    }
}

/// Demo mode only: the storefront page plays the payment provider.
#[utoipa::path(post, path = "/payment_webhook/{payment_id}/{status}", tag = "payments",
    params(("payment_id" = String, Path, description = "The checkout's payment id"),
        ("status" = String, Path, description = "paid or failed")),
    responses(
        (status = 200, description = "The order id", content((String = "text/plain"), (OrderIdBody = "application/json"))),
        (status = 400, description = "invalid_status, invalid_payment_id", body = ErrorBody),
        (status = 404, description = "unknown_payment", body = ErrorBody),
        (status = 409, description = "payment_conflict, checkout_expired, checkout_ended, out_of_stock", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
        (status = 504, description = "order_not_ready: retry with the same status", body = ErrorBody)))]
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
        let order_id = order_id
            .as_i64()
            .ok_or_else(|| ApiError::internal(format!("the order id event holds {order_id}")))?;
        Ok(text_or_json(
            &headers,
            StatusCode::OK,
            order_id.to_string(),
            OrderIdBody { order_id },
        ))
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
    text_or_json(
        headers,
        StatusCode::ACCEPTED,
        worker_id.clone(),
        WorkerIdBody { worker_id },
    )
}

/// Chaos only: one worker aborts on the spot.
#[utoipa::path(post, path = "/crash_application", tag = "chaos",
    responses(
        (status = 202, description = "The worker told to crash", content((String = "text/plain"), (WorkerIdBody = "application/json"))),
        (status = 403, description = "chaos_disabled", body = ErrorBody),
        (status = 503, description = "no_workers, database unavailable", body = ErrorBody)))]
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

/// Chaos only: that worker aborts on the spot.
#[utoipa::path(post, path = "/workers/{id}/crash", tag = "chaos",
    params(("id" = String, Path, description = "A worker's id")),
    responses(
        (status = 202, description = "The worker told to crash", content((String = "text/plain"), (WorkerIdBody = "application/json"))),
        (status = 400, description = "invalid_worker_id", body = ErrorBody),
        (status = 403, description = "chaos_disabled", body = ErrorBody),
        (status = 404, description = "unknown_worker", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody)))]
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
#[utoipa::path(get, path = "/workers", tag = "fleet",
    responses((status = 200, description = "OK", body = Vec<PublicWorker>), (status = 503, description = "Database unavailable", body = ErrorBody)))]
async fn workers(State(state): State<AppState>) -> ApiResult<Json<Vec<PublicWorker>>> {
    let workers = fleet::list_workers(&state.pool)
        .await?
        .into_iter()
        .map(|w| PublicWorker {
            id: w.id,
            version: w.version,
            queues: w.queues,
            started_at: w.started_at,
            last_seen: w.last_seen,
            in_flight: w.in_flight,
            draining: w.draining,
        })
        .collect();
    Ok(Json(workers))
}

/// What the storefront page needs to know about this deployment.
#[utoipa::path(get, path = "/config", tag = "shop", responses((status = 200, description = "OK", body = ConfigView)))]
async fn config(State(state): State<AppState>) -> Json<ConfigView> {
    Json(ConfigView {
        chaos: state.chaos,
        dispatch_steps: DISPATCH_STEPS,
        demo_payments: state.demo_payments,
    })
}

/// `ok` while the process lives.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "ok", content_type = "text/plain", body = String)))]
async fn healthz() -> &'static str {
    "ok"
}

/// `ready` once the database answers and its migrations are applied.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, description = "ready", content_type = "text/plain", body = String),
        (status = 503, description = "migrations_pending, database unavailable", body = ErrorBody)))]
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
