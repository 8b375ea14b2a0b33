//! What the API answers, as types: each JSON body is one of these, and the
//! OpenAPI document (`GET /openapi.json`) is generated from them.

use chrono::{DateTime, Utc};
use engine::{EventRecord, MessageRecord, StepRecord, WorkflowRecord, WorkflowSummary};
use rust_decimal::prelude::ToPrimitive;
use serde::Serialize;
use serde_json::Value;
use store::payments::LedgerEntry;
use store::{Order, OrderStatus, Product};
use utoipa::ToSchema;

/// Every error: a stable code for programs, a message for people.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// An error's code and message.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable (`out_of_stock`, `invalid_key`, ...).
    pub code: String,
    /// For people; never a database's words.
    pub message: String,
}

/// The product.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProductView {
    /// Its id.
    pub product_id: i32,
    /// Its name.
    pub product: String,
    /// Its description.
    pub description: String,
    /// Units in stock.
    pub inventory: i32,
    /// Its price.
    pub price: Option<f64>,
}

impl From<&Product> for ProductView {
    fn from(p: &Product) -> Self {
        ProductView {
            product_id: p.id,
            product: p.name.clone(),
            description: p.description.clone(),
            inventory: p.inventory,
            price: p.price.to_f64(),
        }
    }
}

/// An order.
#[derive(Debug, Serialize, ToSchema)]
pub struct OrderView {
    /// Its id.
    pub order_id: i64,
    /// The demo's code: PENDING 0, DISPATCHED 1, PAID 2, CANCELLED -1.
    pub order_status: i32,
    /// Its status.
    pub status: OrderStatus,
    /// When it last changed.
    pub last_update_time: DateTime<Utc>,
    /// Dispatch steps left.
    pub progress_remaining: i32,
}

impl From<&Order> for OrderView {
    fn from(o: &Order) -> Self {
        let status = o.order_status();
        OrderView {
            order_id: o.id,
            order_status: status.demo_code(),
            status,
            last_update_time: o.last_update_time,
            progress_remaining: o.progress_remaining,
        }
    }
}

/// An order's workflow as its timeline shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct TimelineRun {
    /// Its kind: `checkout` or `dispatch`.
    pub workflow: String,
    /// Its status.
    pub status: String,
    /// The worker running it now.
    pub worker_id: Option<String>,
    /// Executions started.
    pub executions: i32,
}

/// A completed step.
#[derive(Debug, Serialize, ToSchema)]
pub struct StepView {
    /// The workflow's kind (in an order's timeline).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
    /// Its position in the workflow, from 0.
    pub seq: i32,
    /// Its name.
    pub name: String,
    /// Its checkpoint.
    pub output: Value,
    /// The worker that ran it.
    pub worker_id: Option<String>,
    /// When it began.
    pub started_at: DateTime<Utc>,
    /// When its checkpoint committed.
    pub finished_at: DateTime<Utc>,
    /// How long it took, in milliseconds.
    pub duration_ms: Option<f64>,
}

impl StepView {
    /// A step of a workflow of `kind` (none: the workflow is implied).
    pub fn of(step: &StepRecord, kind: Option<&str>) -> Self {
        let duration = step.finished_at - step.started_at;
        StepView {
            workflow: kind.map(str::to_owned),
            seq: step.step_seq,
            name: step.name.clone(),
            output: step.output.clone(),
            worker_id: step.worker_id.clone(),
            started_at: step.started_at,
            finished_at: step.finished_at,
            duration_ms: duration.num_microseconds().map(|us| us as f64 / 1000.0),
        }
    }
}

/// An order with its workflows, steps and payments.
#[derive(Debug, Serialize, ToSchema)]
pub struct TimelineView {
    /// The order.
    #[serde(flatten)]
    pub order: OrderView,
    /// Its checkout and dispatch.
    pub workflows: Vec<TimelineRun>,
    /// Their steps in order, checkout first.
    pub steps: Vec<StepView>,
    /// The provider's deliveries for it.
    pub payments: Vec<LedgerEntry>,
}

/// A live worker as anyone may see it.
#[derive(Debug, Serialize, ToSchema)]
pub struct PublicWorker {
    /// Its id.
    pub id: String,
    /// The code version it runs.
    pub version: Option<String>,
    /// The queues it consumes.
    pub queues: Vec<String>,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// Its last heartbeat.
    pub last_seen: DateTime<Utc>,
    /// Workflows it is executing.
    pub in_flight: i32,
    /// Whether it is draining (SIGTERM).
    pub draining: bool,
}

/// What the storefront page needs to know about this deployment.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConfigView {
    /// Crash buttons allowed.
    pub chaos: bool,
    /// Progress steps of a dispatch.
    pub dispatch_steps: i32,
    /// The page may play the payment provider.
    pub demo_payments: bool,
}

/// `{"payment_id"}` (with `Accept: application/json`).
#[derive(Debug, Serialize, ToSchema)]
pub struct PaymentIdBody {
    /// The payment id (the checkout's key).
    pub payment_id: String,
}

/// `{"order_id"}` (with `Accept: application/json`).
#[derive(Debug, Serialize, ToSchema)]
pub struct OrderIdBody {
    /// The order's id.
    pub order_id: i64,
}

/// `{"worker_id"}` (with `Accept: application/json`).
#[derive(Debug, Serialize, ToSchema)]
pub struct WorkerIdBody {
    /// The worker told to crash.
    pub worker_id: String,
}

/// The unfinished workflows of one code version and kind, for the admin.
#[derive(Debug, Serialize, ToSchema)]
pub struct VersionView {
    /// The version, kind, count and the workers that can run them.
    #[serde(flatten)]
    pub in_flight: engine::VersionInFlight,
    /// No live worker can run them: they wait for a worker of their version.
    pub stranded: bool,
}

/// A page of the admin's workflow list.
#[derive(Debug, Serialize, ToSchema)]
pub struct WorkflowPage {
    /// Newest first.
    pub workflows: Vec<WorkflowSummary>,
    /// Pass back as `cursor` for the next page; none after the last.
    pub next_cursor: Option<String>,
}

/// One workflow in full, for the admin.
#[derive(Debug, Serialize, ToSchema)]
pub struct WorkflowDetail {
    /// Its row, input and output.
    pub workflow: WorkflowRecord,
    /// Its completed steps.
    pub steps: Vec<StepView>,
    /// The events it set.
    pub events: Vec<EventRecord>,
    /// The messages sent to it.
    pub messages: Vec<MessageRecord>,
}

/// What an admin action did.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ActionOutcome {
    /// The cancel reached the workflow; it compensates, then ends cancelled.
    CancelRequested,
    /// Its compensation was already running.
    Ending,
    /// It runs again from its last checkpoint.
    Resumed,
    /// Deleted, with its steps, events and messages.
    Deleted,
}

/// The answer of cancel, resume and delete.
#[derive(Debug, Serialize, ToSchema)]
pub struct ActionAnswer {
    /// The workflow.
    pub workflow_id: String,
    /// What happened.
    pub outcome: ActionOutcome,
}

/// The answer of restart.
#[derive(Debug, Serialize, ToSchema)]
pub struct RestartAnswer {
    /// The new workflow.
    pub workflow_id: String,
    /// Its kind.
    pub kind: String,
    /// The original, untouched.
    pub restarted_from: String,
    /// The first step it runs (the checkpoints before it were copied).
    pub from_step: i32,
}
