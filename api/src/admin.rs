//! The operator's API under `/admin/`: list and inspect workflows, cancel,
//! resume and restart them, see the fleet in full. Every route but the page
//! itself (static, it holds no data) takes `Authorization: Bearer <token>`;
//! with no token configured none is routed (404). Every action is logged
//! with the token's label, never the token.

use std::fmt;
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::{Extension, Json};
use engine::fleet::{self, WorkerInfo};
use engine::{CancelOutcome, Cursor, DeleteOutcome, EngineError, WorkflowFilter, WorkflowStatus};
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::error::ApiError;
use crate::views::{
    ActionAnswer, ActionOutcome, ErrorBody, RestartAnswer, StepView, VersionView, WorkflowDetail,
    WorkflowPage,
};
use crate::{AppState, secrets::Secret};

/// Largest `limit` of the workflow list.
pub const LIST_LIMIT_MAX: i64 = 500;
const LIST_LIMIT_DEFAULT: i64 = 50;
/// Shortest admin token accepted.
pub const TOKEN_MIN_LEN: usize = 24;

/// The admin tokens, each with a label the log names (`label=token`; a
/// token without one is labelled by its digest's first bytes). Only their
/// SHA-256 digests are kept. Never printed.
#[derive(Clone, Default)]
pub struct AdminTokens(Vec<(String, [u8; 32])>);

impl fmt::Debug for AdminTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let labels: Vec<&str> = self.0.iter().map(|(label, _)| label.as_str()).collect();
        write!(f, "AdminTokens({labels:?})")
    }
}

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

impl AdminTokens {
    /// Whether admin is enabled.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The label of the token `presented` is, compared in constant time
    /// (over digests, so the length tells nothing either).
    fn label_of(&self, presented: &[u8]) -> Option<&str> {
        let presented = digest(presented);
        let mut found = None;
        for (label, known) in &self.0 {
            if bool::from(known.ct_eq(&presented)) {
                found = Some(label.as_str());
            }
        }
        found
    }
}

impl Secret for AdminTokens {
    const NAME: &'static str = "ADMIN_TOKEN";

    /// `[label=]token[,[label=]token...]`; empty for none.
    fn parse(text: &str) -> Result<Self, String> {
        let mut tokens = Vec::new();
        for (i, entry) in text.split(',').map(str::trim).enumerate() {
            if entry.is_empty() {
                continue;
            }
            let n = i + 1;
            let (label, token) = match entry.split_once('=') {
                Some((label, token)) => (Some(label), token),
                None => (None, entry),
            };
            if token.len() < TOKEN_MIN_LEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(format!(
                    "token {n} must be at least {TOKEN_MIN_LEN} printable characters, no spaces"
                ));
            }
            let hash = digest(token.as_bytes());
            let label = match label {
                Some(label)
                    if (1..=64).contains(&label.len())
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) =>
                {
                    label.to_owned()
                }
                Some(_) => {
                    return Err(format!(
                        "token {n}'s label must be 1 to 64 of A-Z a-z 0-9 . _ -"
                    ));
                }
                None => format!(
                    "token-{:02x}{:02x}{:02x}{:02x}",
                    hash[0], hash[1], hash[2], hash[3]
                ),
            };
            tokens.push((label, hash));
        }
        Ok(Self(tokens))
    }
}

/// Who is calling: the label of their token.
#[derive(Debug, Clone)]
struct Operator(String);

/// The admin routes, each with its OpenAPI description (none without a
/// token configured).
pub fn routes(tokens: &AdminTokens) -> OpenApiRouter<AppState> {
    if tokens.is_empty() {
        return OpenApiRouter::new();
    }
    let guarded = OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(detail, delete))
        .routes(routes!(cancel))
        .routes(routes!(resume))
        .routes(routes!(restart))
        .routes(routes!(workers))
        .routes(routes!(versions))
        .route_layer(middleware::from_fn_with_state(tokens.clone(), authenticate));
    OpenApiRouter::new().routes(routes!(page)).merge(guarded)
}

/// The admin page (static: it asks for the token and keeps it in the tab).
#[utoipa::path(get, path = "/admin/", tag = "admin",
    responses((status = 200, description = "The admin page", content_type = "text/html", body = String)))]
async fn page() -> Html<&'static str> {
    Html(include_str!("admin.html"))
}

/// 401 unless the request carries a configured token.
async fn authenticate(
    State(tokens): State<AdminTokens>,
    mut request: Request,
    next: Next,
) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    let label = presented.and_then(|token| tokens.label_of(token));
    match label {
        Some(label) => {
            let operator = Operator(label.to_owned());
            request.extensions_mut().insert(operator);
            next.run(request).await
        }
        None => {
            let (code, message) = if presented.is_none() {
                ("missing_token", "send Authorization: Bearer <admin token>")
            } else {
                ("invalid_token", "this admin token is not valid")
            };
            let mut response =
                ApiError::new(StatusCode::UNAUTHORIZED, code, message).into_response();
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            response
        }
    }
}

#[derive(Deserialize, IntoParams)]
struct ListQuery {
    /// enqueued, running, waiting, succeeded, failed or cancelled.
    status: Option<String>,
    /// A workflow kind (checkout, dispatch).
    kind: Option<String>,
    /// Only those pinned to this code version.
    version: Option<String>,
    /// Only those unchanged this long (90s, 5m, 2h).
    older_than: Option<String>,
    /// The `next_cursor` of the page before.
    cursor: Option<String>,
    /// How many, 1 to 500 (default 50).
    limit: Option<String>,
}

fn parse_filter(query: ListQuery) -> Result<WorkflowFilter, ApiError> {
    let status = match query.status.as_deref() {
        None | Some("") => None,
        Some(text) => Some(WorkflowStatus::parse(text).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_status",
                "status must be enqueued, running, waiting, succeeded, failed or cancelled",
            )
        })?),
    };
    let kind = match query.kind {
        Some(kind) if kind.len() > 64 => {
            return Err(ApiError::bad_request(
                "invalid_kind",
                "kind is at most 64 characters",
            ));
        }
        kind => kind.filter(|k| !k.is_empty()),
    };
    let version = match query.version {
        Some(version) if version.len() > 128 => {
            return Err(ApiError::bad_request(
                "invalid_version",
                "version is at most 128 characters",
            ));
        }
        version => version.filter(|v| !v.is_empty()),
    };
    let older_than = match query.older_than.as_deref() {
        None | Some("") => None,
        Some(text) => Some(
            humantime::parse_duration(text)
                .ok()
                .filter(|d| *d <= Duration::from_secs(10 * 365 * 86_400))
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_older_than",
                        "older_than is a duration such as 90s, 5m or 2h",
                    )
                })?,
        ),
    };
    let after = match query.cursor.as_deref() {
        None | Some("") => None,
        Some(text) => Some(Cursor::decode(text).ok_or_else(|| {
            ApiError::bad_request("invalid_cursor", "cursor is the next_cursor of a page")
        })?),
    };
    let limit = match query.limit.as_deref() {
        None | Some("") => LIST_LIMIT_DEFAULT,
        Some(text) => text
            .parse()
            .ok()
            .filter(|n| (1..=LIST_LIMIT_MAX).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_limit",
                    format!("limit must be an integer from 1 to {LIST_LIMIT_MAX}"),
                )
            })?,
    };
    Ok(WorkflowFilter {
        status,
        kind,
        version,
        older_than,
        after,
        limit,
    })
}

/// Workflows, newest first, one page.
#[utoipa::path(get, path = "/admin/workflows", tag = "admin", params(ListQuery),
    security(("admin_token" = [])),
    responses((status = 200, description = "OK", body = WorkflowPage),
        (status = 400, description = "invalid_status, invalid_kind, invalid_version, invalid_older_than, invalid_cursor, invalid_limit", body = ErrorBody),
        (status = 401, description = "missing_token, invalid_token", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody)))]
async fn list(
    State(state): State<AppState>,
    Query(query): Query<ListQuery>,
) -> Result<Json<WorkflowPage>, ApiError> {
    let filter = parse_filter(query)?;
    let page = state.engine.list(&filter).await?;
    let next_cursor = (page.len() as i64 == filter.limit)
        .then(|| page.last().map(|w| w.cursor().encode()))
        .flatten();
    Ok(Json(WorkflowPage {
        workflows: page,
        next_cursor,
    }))
}

fn unknown_workflow(id: &str) -> ApiError {
    ApiError::not_found("unknown_workflow", format!("no workflow {id}"))
}

/// Engine errors of the admin actions, worded for an operator.
fn admin_error(id: &str, error: EngineError) -> ApiError {
    match error {
        EngineError::UnknownWorkflow(_) => unknown_workflow(id),
        EngineError::NotResumable { status, .. } => ApiError::conflict(
            "not_resumable",
            format!("workflow is {status}; only failed or cancelled workflows resume"),
        ),
        EngineError::Compensated(_) => ApiError::conflict(
            "compensated",
            "its compensation ran (its effects are undone): restart it instead",
        ),
        EngineError::NoSuchStep { steps, .. } => ApiError::bad_request(
            "invalid_from_step",
            format!("from_step must be from 0 to {steps}, the workflow's own steps"),
        ),
        other => other.into(),
    }
}

/// One workflow: its row, input, output, steps, events and messages.
#[utoipa::path(get, path = "/admin/workflows/{id}", tag = "admin",
    params(("id" = String, Path, description = "The workflow's id")),
    security(("admin_token" = [])),
    responses((status = 200, description = "OK", body = WorkflowDetail),
        (status = 401, description = "missing_token, invalid_token", body = ErrorBody),
        (status = 404, description = "unknown_workflow", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody)))]
async fn detail(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<WorkflowDetail>, ApiError> {
    let engine = &state.engine;
    let record = engine
        .workflow(&id)
        .await?
        .ok_or_else(|| unknown_workflow(&id))?;
    let steps = engine.steps(&id).await?;
    Ok(Json(WorkflowDetail {
        workflow: record,
        steps: steps.iter().map(|step| StepView::of(step, None)).collect(),
        events: engine.events(&id).await?,
        messages: engine.messages(&id).await?,
    }))
}

/// Delivers a cancel: the workflow runs its compensation (a checkout cancels
/// its order and returns its unit), then ends cancelled.
#[utoipa::path(post, path = "/admin/workflows/{id}/cancel", tag = "admin",
    params(("id" = String, Path, description = "The workflow's id")),
    security(("admin_token" = [])),
    responses((status = 202, description = "Accepted", body = ActionAnswer),
        (status = 401, description = "missing_token, invalid_token", body = ErrorBody),
        (status = 404, description = "unknown_workflow", body = ErrorBody),
        (status = 409, description = "already_finished", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody)))]
async fn cancel(
    State(state): State<AppState>,
    Extension(Operator(operator)): Extension<Operator>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let outcome = state
        .engine
        .cancel(&id)
        .await
        .map_err(|e| admin_error(&id, e))?;
    tracing::info!(admin = operator, action = "cancel", workflow_id = id, outcome = ?outcome, "admin action");
    let outcome = match outcome {
        CancelOutcome::Requested => ActionOutcome::CancelRequested,
        CancelOutcome::Ending => ActionOutcome::Ending,
        CancelOutcome::Finished(status) => {
            return Err(ApiError::conflict(
                "already_finished",
                format!("workflow already {}; nothing to cancel", status.as_str()),
            ));
        }
    };
    Ok((
        StatusCode::ACCEPTED,
        Json(ActionAnswer {
            workflow_id: id,
            outcome,
        }),
    )
        .into_response())
}

/// Deletes a finished workflow now, with its steps, events and messages
/// (retention does after `WORKFLOW_RETENTION`); orders and payments stay.
#[utoipa::path(delete, path = "/admin/workflows/{id}", tag = "admin",
    params(("id" = String, Path, description = "The workflow's id")),
    security(("admin_token" = [])),
    responses((status = 200, description = "Deleted", body = ActionAnswer),
        (status = 401, description = "missing_token, invalid_token", body = ErrorBody),
        (status = 404, description = "unknown_workflow", body = ErrorBody),
        (status = 409, description = "not_finished, child_unfinished", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody)))]
async fn delete(
    State(state): State<AppState>,
    Extension(Operator(operator)): Extension<Operator>,
    Path(id): Path<String>,
) -> Result<Json<ActionAnswer>, ApiError> {
    let outcome = state
        .engine
        .delete(&id)
        .await
        .map_err(|e| admin_error(&id, e))?;
    tracing::info!(admin = operator, action = "delete", workflow_id = id, outcome = ?outcome, "admin action");
    match outcome {
        DeleteOutcome::Deleted => Ok(Json(ActionAnswer {
            workflow_id: id,
            outcome: ActionOutcome::Deleted,
        })),
        DeleteOutcome::Unfinished(status) => Err(ApiError::conflict(
            "not_finished",
            format!("workflow is {}; cancel it first", status.as_str()),
        )),
        DeleteOutcome::ChildUnfinished => Err(ApiError::conflict(
            "child_unfinished",
            "a workflow it started has not finished yet",
        )),
    }
}

/// Runs a failed or cancelled workflow again from its last checkpoint.
#[utoipa::path(post, path = "/admin/workflows/{id}/resume", tag = "admin",
    params(("id" = String, Path, description = "The workflow's id")),
    security(("admin_token" = [])),
    responses((status = 202, description = "Accepted", body = ActionAnswer),
        (status = 401, description = "missing_token, invalid_token", body = ErrorBody),
        (status = 404, description = "unknown_workflow", body = ErrorBody),
        (status = 409, description = "not_resumable, compensated (restart it)", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody)))]
async fn resume(
    State(state): State<AppState>,
    Extension(Operator(operator)): Extension<Operator>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let resumed = state.engine.resume(&id).await;
    tracing::info!(
        admin = operator,
        action = "resume",
        workflow_id = id,
        ok = resumed.is_ok(),
        "admin action"
    );
    resumed.map_err(|e| admin_error(&id, e))?;
    Ok((
        StatusCode::ACCEPTED,
        Json(ActionAnswer {
            workflow_id: id,
            outcome: ActionOutcome::Resumed,
        }),
    )
        .into_response())
}

/// What a restart reuses (none: nothing, it runs from the start).
#[derive(Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
struct RestartBody {
    /// The first step to run; the checkpoints before it are copied.
    from_step: Option<i32>,
}

/// Starts a new workflow from the same input (or from a step on, reusing the
/// checkpoints before it); the original is untouched.
#[utoipa::path(post, path = "/admin/workflows/{id}/restart", tag = "admin",
    params(("id" = String, Path, description = "The workflow's id")),
    request_body(content = Option<RestartBody>, description = "Empty, or where to start"),
    security(("admin_token" = [])),
    responses((status = 201, description = "Created", body = RestartAnswer),
        (status = 400, description = "invalid_body, invalid_from_step", body = ErrorBody),
        (status = 401, description = "missing_token, invalid_token", body = ErrorBody),
        (status = 404, description = "unknown_workflow", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody)))]
async fn restart(
    State(state): State<AppState>,
    Extension(Operator(operator)): Extension<Operator>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let body: RestartBody = if body.iter().all(u8::is_ascii_whitespace) {
        RestartBody::default()
    } else {
        serde_json::from_slice::<Value>(&body)
            .ok()
            .filter(Value::is_object)
            .and_then(|object| serde_json::from_value(object).ok())
            .ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_body",
                    "body must be empty or {\"from_step\": <integer>}",
                )
            })?
    };
    // A new id any client can use as a payment id too (a restarted checkout).
    let new_id = uuid::Uuid::new_v4().simple().to_string();
    let started = state
        .engine
        .restart(&id, &new_id, body.from_step)
        .await
        .map_err(|e| admin_error(&id, e))?;
    tracing::info!(
        admin = operator,
        action = "restart",
        workflow_id = id,
        new_workflow_id = started.id,
        from_step = body.from_step,
        "admin action"
    );
    Ok((
        StatusCode::CREATED,
        Json(RestartAnswer {
            workflow_id: started.id,
            kind: started.kind,
            restarted_from: id,
            from_step: body.from_step.unwrap_or(0),
        }),
    )
        .into_response())
}

/// The live fleet with hosts and process ids.
#[utoipa::path(get, path = "/admin/workers", tag = "admin", operation_id = "admin_workers",
    security(("admin_token" = [])),
    responses((status = 200, description = "OK", body = Vec<WorkerInfo>),
        (status = 401, description = "missing_token, invalid_token", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody)))]
async fn workers(State(state): State<AppState>) -> Result<Json<Vec<WorkerInfo>>, ApiError> {
    Ok(Json(fleet::list_workers(&state.pool).await?))
}

/// Unfinished workflows by code version and kind, with the live workers
/// that can run them: a version whose workflows are all gone can be scaled
/// to zero; `stranded` ones wait for a worker of their version.
#[utoipa::path(get, path = "/admin/versions", tag = "admin",
    security(("admin_token" = [])),
    responses((status = 200, description = "OK", body = Vec<VersionView>),
        (status = 401, description = "missing_token, invalid_token", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody)))]
async fn versions(State(state): State<AppState>) -> Result<Json<Vec<VersionView>>, ApiError> {
    let versions = state.engine.versions().await?;
    Ok(Json(
        versions
            .into_iter()
            .map(|v| VersionView {
                stranded: v.stranded(),
                in_flight: v,
            })
            .collect(),
    ))
}
