//! The two kinds of step a workflow takes, each with its options.
//!
//! - A **database step** ([`WorkflowContext::db_step`]): its effect and its
//!   checkpoint commit together, so it happens exactly once. Its body is one
//!   of
//!   - [`Statement`]: one SQL statement, sent with its checkpoint as one
//!     statement (one round trip);
//!   - [`ForEach`]: one SQL statement written over the rows of every
//!     workflow that takes the same step at about the same time, batched
//!     into one statement and one commit;
//!   - [`Transaction`]: an async closure given the step's transaction, for
//!     reads then writes or several statements.
//! - An **external effect** ([`WorkflowContext::effect`], body [`Effect`]):
//!   a call outside the database, at least once, with a stable idempotency
//!   key; checkpointed after it succeeds.
//!
//! Options are methods on the body. One the engine cannot honour with the
//! others does not exist on the type: an unflushed statement has no
//! `event`, a batched one no `bind`, a step starts at most one workflow.
//! The compiler refuses such a step; nothing is silently ignored.
//!
//! ```ignore
//! let left: Option<i32> = ctx.db_step("reserve", Statement::new(
//!     "UPDATE products SET inventory = inventory - 1 WHERE id = $1 AND inventory > 0
//!      RETURNING inventory AS output").bind(product_id).unflushed()).await?;
//! let visits: i64 = ctx.db_step("count_visit", Transaction::new(async move |tx| {
//!     Ok(sqlx::query_scalar("SELECT count(*) FROM visits").fetch_one(tx).await?)
//! }).event("visits_counted", true)).await?;
//! let receipt: String = ctx.effect("charge", Effect::new(async move |key| {
//!     provider.charge(key, amount).await
//! })).await?;
//! ```
//!
//! [`WorkflowContext::db_step`]: crate::WorkflowContext::db_step
//! [`WorkflowContext::effect`]: crate::WorkflowContext::effect

use std::future::Future;
use std::marker::PhantomData;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use sqlx::postgres::PgArguments;
use sqlx::{Arguments, Encode, PgConnection, Postgres, Type};

use crate::{RetryPolicy, StepError, WorkflowContext, WorkflowError, WorkflowKind};

/// A database step's body and options, run by
/// [`WorkflowContext::db_step`](crate::WorkflowContext::db_step), which
/// returns a `T`. Implemented by [`Statement`], [`ForEach`], [`Final`] and
/// [`Transaction`] only.
pub trait DatabaseStep<T>: sealed::Sealed + Send {
    #[doc(hidden)]
    fn run<'a>(
        self,
        ctx: &'a mut WorkflowContext,
        name: &'a str,
    ) -> impl Future<Output = Result<T, WorkflowError>> + 'a;
}

mod sealed {
    pub trait Sealed {}
}

/// What a statement step's options have chosen so far: see [`Statement`].
pub mod state {
    /// Nothing yet: every option is open.
    pub struct Plain;
    /// It publishes events: it cannot be unflushed.
    pub struct Publishing;
    /// It starts a workflow (one at most), perhaps with events.
    pub struct Starting;
    /// Its commit does not wait for the WAL flush: it publishes nothing,
    /// starts nothing and does not end the workflow.
    pub struct Unflushed;

    /// A state that may publish, start and end the workflow.
    pub trait Publishes: super::sealed::Sealed {
        /// The state after an event.
        type WithEvent;
    }
    /// A state that may still start a workflow.
    pub trait MayStart: Publishes {}

    impl super::sealed::Sealed for Plain {}
    impl super::sealed::Sealed for Publishing {}
    impl super::sealed::Sealed for Starting {}
    impl Publishes for Plain {
        type WithEvent = Publishing;
    }
    impl Publishes for Publishing {
        type WithEvent = Publishing;
    }
    impl Publishes for Starting {
        type WithEvent = Starting;
    }
    impl MayStart for Plain {}
    impl MayStart for Publishing {}
}
use state::{MayStart, Plain, Publishes, Starting, Unflushed};

/// How a statement step commits.
#[derive(Clone)]
pub(crate) enum Commit {
    /// Joins the transaction open from the steps before it, or commits on
    /// its own, waiting for its WAL flush.
    Flushed,
    /// Commits on its own without waiting for the flush (what is open
    /// before it commits first, flushed).
    Unflushed,
    /// Batched with the same step of other workflows (a [`ForEach`]); its
    /// `input.arg`.
    Batched(Value),
}

/// What the engine runs for a statement step: the statement and its
/// options, whatever typed form built it.
pub(crate) struct StatementSpec {
    pub(crate) sql: &'static str,
    pub(crate) arguments: PgArguments,
    pub(crate) commit: Commit,
    /// Events published with the step.
    pub(crate) events: Vec<(String, Value)>,
    /// A workflow started with the step.
    pub(crate) start: Option<(WorkflowKind, String, Value)>,
    /// The workflow's output, when the step ends it.
    pub(crate) finish: Option<Value>,
    pub(crate) retry: Option<RetryPolicy>,
    /// A value that could not be encoded: the step fails with it.
    pub(crate) unencodable: Option<String>,
}

impl StatementSpec {
    fn new(sql: &'static str, commit: Commit) -> Self {
        StatementSpec {
            sql,
            arguments: PgArguments::default(),
            commit,
            events: Vec::new(),
            start: None,
            finish: None,
            retry: None,
            unencodable: None,
        }
    }

    fn problem(&mut self, problem: String) {
        self.unencodable.get_or_insert(problem);
    }

    fn event(&mut self, key: &str, value: impl Serialize) {
        if self.events.iter().any(|(k, _)| k == key) {
            self.problem(format!("event {key} is set twice by one step"));
        }
        match serde_json::to_value(value) {
            Ok(value) => self.events.push((key.to_owned(), value)),
            Err(e) => self.problem(format!("event {key} does not encode: {e}")),
        }
    }

    fn finish<O: Serialize>(mut self, output: &O) -> Self {
        match serde_json::to_value(output) {
            Ok(value) => self.finish = Some(value),
            Err(e) => self.problem(format!("the workflow's output does not encode: {e}")),
        }
        self
    }
}

/// A database step whose effect is one SQL statement, sent with its
/// checkpoint as one statement: one round trip and, with nothing open
/// before it, its own commit. Any row it locks is held only while it runs.
/// Should the checkpoint be refused (another execution wrote it, the
/// workflow was cancelled or has finished), the statement fails as a whole
/// and its effect is undone.
///
/// The statement returns at most one row, whose column `output` is the
/// step's value (no row, or a SQL null, is JSON null). It must not begin
/// with `WITH`: the engine puts it in a `WITH` of its own.
///
/// `S` records the options chosen ([`state`]): `unflushed` only on a step
/// that publishes nothing; `start` once.
///
/// ```no_run
/// # use engine::{Statement, WorkflowContext, WorkflowError};
/// # async fn f(ctx: &mut WorkflowContext) -> Result<(), WorkflowError> {
/// let take = Statement::new("UPDATE stock SET n = n - 1 WHERE id = $1 AND n > 0 RETURNING n AS output");
/// let left: Option<i32> = ctx.db_step("take", take.bind(7).unflushed()).await?;
/// # Ok(()) }
/// ```
///
/// An unflushed step cannot publish (its event could be heard before the
/// step is durable), nor start a workflow or end this one:
///
/// ```compile_fail,E0599
/// # use engine::{Statement, WorkflowContext, WorkflowError};
/// # async fn f(ctx: &mut WorkflowContext) -> Result<(), WorkflowError> {
/// let take = Statement::new("UPDATE stock SET n = n - 1 WHERE id = $1 AND n > 0 RETURNING n AS output");
/// let left: Option<i32> = ctx.db_step("take", take.bind(7).unflushed().event("taken", true)).await?;
/// # Ok(()) }
/// ```
///
/// ```compile_fail,E0599
/// # use engine::{Statement, WorkflowContext, WorkflowError};
/// # async fn f(ctx: &mut WorkflowContext) -> Result<(), WorkflowError> {
/// let take = Statement::new("UPDATE stock SET n = n - 1 WHERE id = $1 AND n > 0 RETURNING n AS output");
/// ctx.db_step("take", take.bind(7).unflushed().ends_workflow(1)).await?;
/// # Ok(()) }
/// ```
///
/// A step starts one workflow at most:
///
/// ```compile_fail,E0599
/// # use engine::{Statement, WorkflowKind};
/// const CHILD: WorkflowKind = WorkflowKind { name: "child", queue: "q" };
/// let step = Statement::new("SELECT 1 AS output").start(CHILD, "a", ()).start(CHILD, "b", ());
/// ```
pub struct Statement<S = Plain> {
    spec: StatementSpec,
    state: PhantomData<fn() -> S>,
}

impl Statement {
    /// A statement with parameters `$1`, `$2`, ... given by
    /// [`Statement::bind`].
    pub fn new(sql: &'static str) -> Self {
        Statement {
            spec: StatementSpec::new(sql, Commit::Flushed),
            state: PhantomData,
        }
    }

    /// A statement written over the relation `input (workflow_id text, arg
    /// jsonb)`, one row per workflow taking the step, that returns at most
    /// one row per `input` row with the columns `workflow_id` and `output`
    /// (the step's value), and touches only rows of the workflow of its
    /// `input` row (PostgreSQL applies one update to a row per statement).
    /// `arg` is this workflow's `input.arg`.
    ///
    /// The steps of this statement that several workflows of a process take
    /// within a few milliseconds run as one statement and one commit (all
    /// or nothing: should one checkpoint be refused, each runs alone, as
    /// does a step with no company). The dispatch's progress steps use it.
    pub fn for_each(sql: &'static str, arg: impl Serialize) -> ForEach {
        let mut spec = StatementSpec::new(sql, Commit::Batched(Value::Null));
        match serde_json::to_value(arg) {
            Ok(arg) => spec.commit = Commit::Batched(arg),
            Err(e) => spec.problem(format!("the argument does not encode: {e}")),
        }
        ForEach { spec }
    }
}

impl Statement<Plain> {
    /// Lets the step's commit return before its WAL flush: for a step on a
    /// row many workflows contend for (a product's stock), so the row is not
    /// held through a flush, and which nobody outside the workflow acts on
    /// before the workflow's next flushed commit (the WAL is one sequence:
    /// that commit carries it). A database crash before then drops the
    /// step with its checkpoint, and the workflow replays it. What is open
    /// from the steps before it commits first, flushed.
    pub fn unflushed(mut self) -> Statement<Unflushed> {
        self.spec.commit = Commit::Unflushed;
        self.to()
    }
}

impl<S> Statement<S> {
    /// Binds the next parameter (`$1`, then `$2`, ...).
    pub fn bind<'t, T: Encode<'t, Postgres> + Type<Postgres>>(mut self, value: T) -> Self {
        if let Err(e) = self.spec.arguments.add(value) {
            let n = self.spec.arguments.len() + 1;
            self.spec
                .problem(format!("parameter ${n} does not encode: {e}"));
        }
        self
    }

    /// The step's own retry policy instead of the workflow's.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.spec.retry = Some(retry);
        self
    }

    fn to<S2>(self) -> Statement<S2> {
        Statement {
            spec: self.spec,
            state: PhantomData,
        }
    }
}

impl<S: Publishes> Statement<S> {
    /// Publishes an event with the step, in its statement: set, and its
    /// waiters notified at the commit, exactly when the step's checkpoint
    /// is written, whatever the statement returned. Keys must differ.
    pub fn event(mut self, key: &str, value: impl Serialize) -> Statement<S::WithEvent> {
        self.spec.event(key, value);
        self.to()
    }

    /// Makes this the workflow's last step: the statement also ends the
    /// workflow, succeeded with `output`, exactly when the step's checkpoint
    /// is written: the step and the end share one commit. The step returns
    /// `output`, for `run` to return at once; a step after it is refused.
    /// Every other option comes before it.
    pub fn ends_workflow<O: Serialize>(self, output: O) -> Final<O> {
        Final {
            spec: self.spec.finish(&output),
            output,
        }
    }
}

impl<S: MayStart> Statement<S> {
    /// Starts a workflow with the step, in its statement (as
    /// [`Engine::start_in`](crate::Engine::start_in) does in a transaction):
    /// started exactly when the step's checkpoint is written, whatever the
    /// statement returned; nothing new when `id` exists already. An `id`
    /// held by a workflow of another kind fails the step.
    ///
    /// When this process runs that kind, has a free slot on its queue, is
    /// not draining and the step commits alone, the new workflow is started
    /// claimed by this process and runs here, without a job, a notification
    /// or a claim of its own; should the process die, the reaper hands it
    /// to the queue like any running workflow of a dead worker.
    pub fn start(
        mut self,
        kind: WorkflowKind,
        id: &str,
        input: impl Serialize,
    ) -> Statement<Starting> {
        if let Err(e) = crate::client::check_id(id) {
            self.spec.problem(format!("cannot start {id:?}: {e}"));
        } else {
            match serde_json::to_value(input) {
                Ok(input) => self.spec.start = Some((kind, id.to_owned(), input)),
                Err(e) => self
                    .spec
                    .problem(format!("the input of {id} does not encode: {e}")),
            }
        }
        self.to()
    }
}

/// A statement step batched with the same step of other workflows: see
/// [`Statement::for_each`]. It publishes nothing and starts nothing (a
/// batch is one statement for many workflows); it may end the workflow.
///
/// ```no_run
/// # use engine::{Statement, WorkflowContext, WorkflowError};
/// # async fn f(ctx: &mut WorkflowContext) -> Result<i64, WorkflowError> {
/// let tick = Statement::for_each(
///     "UPDATE clocks SET n = n + 1 FROM input WHERE clocks.id = (input.arg)::bigint
///      RETURNING input.workflow_id, n AS output",
///     7,
/// );
/// ctx.db_step("tick", tick.ends_workflow(7_i64)).await
/// # }
/// ```
///
/// Its value comes as `input.arg`, not as a parameter, and it cannot
/// publish:
///
/// ```compile_fail,E0599
/// # use engine::Statement;
/// let tick = Statement::for_each("SELECT input.workflow_id, 1 AS output FROM input", 7).bind(8);
/// ```
///
/// ```compile_fail,E0599
/// # use engine::Statement;
/// let tick = Statement::for_each("SELECT input.workflow_id, 1 AS output FROM input", 7).event("ticked", true);
/// ```
pub struct ForEach {
    spec: StatementSpec,
}

impl ForEach {
    /// The step's own retry policy instead of the workflow's.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.spec.retry = Some(retry);
        self
    }

    /// Makes this the workflow's last step, as
    /// [`Statement::ends_workflow`] does; it is still batched.
    pub fn ends_workflow<O: Serialize>(self, output: O) -> Final<O> {
        Final {
            spec: self.spec.finish(&output),
            output,
        }
    }
}

/// A statement step that ends the workflow with `O`: see
/// [`Statement::ends_workflow`].
pub struct Final<O> {
    spec: StatementSpec,
    output: O,
}

/// A database step whose effect is an async closure given the step's
/// transaction (`&mut PgConnection`), which also inserts the checkpoint:
/// both commit or neither. The closure may run again on a retry, so it
/// captures owned values (`async move |tx| ...`): today's compiler refuses a
/// closure borrowing the workflow's locals here ("does not fulfill the
/// required lifetime").
pub struct Transaction<F> {
    pub(crate) body: F,
    pub(crate) events: Vec<(String, Value)>,
    pub(crate) retry: Option<RetryPolicy>,
    pub(crate) unencodable: Option<String>,
}

impl<F> Transaction<F> {
    /// A step running `body` in its transaction.
    pub fn new<T>(body: F) -> Self
    where
        F: AsyncFnMut(&mut PgConnection) -> Result<T, StepError>,
    {
        Transaction {
            body,
            events: Vec::new(),
            retry: None,
            unencodable: None,
        }
    }

    /// Publishes an event with the step, in its transaction: set, and its
    /// waiters notified at the commit, exactly when the step's checkpoint is
    /// written. Keys must differ.
    pub fn event(mut self, key: &str, value: impl Serialize) -> Self {
        if self.events.iter().any(|(k, _)| k == key) {
            self.unencodable
                .get_or_insert(format!("event {key} is set twice by one step"));
        }
        match serde_json::to_value(value) {
            Ok(value) => self.events.push((key.to_owned(), value)),
            Err(e) => {
                self.unencodable
                    .get_or_insert(format!("event {key} does not encode: {e}"));
            }
        }
        self
    }

    /// The step's own retry policy instead of the workflow's.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = Some(retry);
        self
    }
}

/// An external effect (a payment API call): at least once, checkpointed
/// after it succeeds. The closure gets a stable idempotency key for the
/// effect, `"<workflow_id>/<step_seq>"`; what is open from the steps before
/// it commits first, and no transaction stays open while it runs. Like a
/// [`Transaction`]'s, the closure captures owned values.
pub struct Effect<F> {
    pub(crate) body: F,
    pub(crate) retry: Option<RetryPolicy>,
}

impl<F> Effect<F> {
    /// An effect running `body` with its idempotency key.
    pub fn new<T>(body: F) -> Self
    where
        F: AsyncFnMut(&str) -> Result<T, StepError>,
    {
        Effect { body, retry: None }
    }

    /// The step's own retry policy instead of the workflow's.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = Some(retry);
        self
    }
}

impl<S> sealed::Sealed for Statement<S> {}
impl sealed::Sealed for ForEach {}
impl<O> sealed::Sealed for Final<O> {}
impl<F> sealed::Sealed for Transaction<F> {}

impl<S, T: DeserializeOwned + Send + 'static> DatabaseStep<T> for Statement<S> {
    fn run<'a>(
        self,
        ctx: &'a mut WorkflowContext,
        name: &'a str,
    ) -> impl Future<Output = Result<T, WorkflowError>> + 'a {
        ctx.run_statement_step(name, self.spec)
    }
}

impl<T: DeserializeOwned + Send + 'static> DatabaseStep<T> for ForEach {
    fn run<'a>(
        self,
        ctx: &'a mut WorkflowContext,
        name: &'a str,
    ) -> impl Future<Output = Result<T, WorkflowError>> + 'a {
        ctx.run_statement_step(name, self.spec)
    }
}

impl<O: Serialize + Send + 'static> DatabaseStep<O> for Final<O> {
    async fn run(self, ctx: &mut WorkflowContext, name: &str) -> Result<O, WorkflowError> {
        let _: Value = ctx.run_statement_step(name, self.spec).await?;
        Ok(self.output)
    }
}

impl<T, F> DatabaseStep<T> for Transaction<F>
where
    T: Serialize + DeserializeOwned + Send + 'static,
    F: AsyncFnMut(&mut PgConnection) -> Result<T, StepError> + Send + 'static,
{
    fn run<'a>(
        self,
        ctx: &'a mut WorkflowContext,
        name: &'a str,
    ) -> impl Future<Output = Result<T, WorkflowError>> + 'a {
        ctx.run_transaction_step(name, self)
    }
}
