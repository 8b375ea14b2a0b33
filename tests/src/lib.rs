//! The test harness: a fresh database per test, real processes (killed with
//! real signals), real HTTP on real ports, and waiting on conditions with a
//! deadline instead of sleeping.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::Instant;

pub mod bench;
pub mod postgres;
pub mod provider;
pub mod workflows;

/// URL of the server's `postgres` database, where test databases are made.
pub fn admin_url() -> String {
    std::env::var("WIDGET_TEST_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable".into())
}

/// `admin` with its database replaced by `name`; its parameters (such as
/// `sslmode`) are kept.
pub fn database_url(admin: &str, name: &str) -> anyhow::Result<String> {
    let (location, params) = match admin.split_once('?') {
        Some((location, params)) => (location, format!("?{params}")),
        None => (admin, String::new()),
    };
    match location.rsplit_once('/') {
        Some((server, _)) if server.contains("://") => Ok(format!("{server}/{name}{params}")),
        _ => bail!("admin URL has no database part: {admin}"),
    }
}

/// A database of its own for one test, migrated.
pub struct TestDb {
    /// Its name.
    pub name: String,
    /// Its URL.
    pub url: String,
    /// A pool on it for the test's own queries. It sees the engine's tables
    /// (schema `engine`) without their schema, as an operator's psql with
    /// `search_path` set would: tests read them as an operator does.
    pub pool: PgPool,
}

/// Which schema a test database gets.
enum Schema {
    /// The engine's and the store's.
    Store,
    /// The engine's alone.
    Engine,
}

impl TestDb {
    /// A fresh database with the engine's and the store's schema.
    pub async fn create() -> anyhow::Result<Self> {
        Self::with_schema(Schema::Store).await
    }

    /// A fresh database with the engine's schema alone: what the engine's
    /// own tests need.
    pub async fn create_for_engine() -> anyhow::Result<Self> {
        Self::with_schema(Schema::Engine).await
    }

    /// A fresh database with the store's schema on the server whose
    /// `postgres` database is at `admin` (a private cluster).
    pub async fn create_on(admin: &str) -> anyhow::Result<Self> {
        Self::with_schema_on(admin.to_owned(), Schema::Store).await
    }

    async fn with_schema(schema: Schema) -> anyhow::Result<Self> {
        Self::with_schema_on(admin_url(), schema).await
    }

    async fn with_schema_on(admin: String, schema: Schema) -> anyhow::Result<Self> {
        let name = format!(
            "widget_t_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let admin_pool = PgPoolOptions::new()
            .max_connections(1)
            .connect(&admin)
            .await
            .with_context(|| {
                format!("connecting to {admin} (set WIDGET_TEST_ADMIN_URL or run tests/run.sh)")
            })?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&admin_pool)
            .await?;
        admin_pool.close().await;
        let url = database_url(&admin, &name)?;
        let pool = inspection_pool(&url, 20).await?;
        match schema {
            Schema::Store => store::db::migrate(&pool).await?,
            Schema::Engine => engine::run_migrations(&pool).await?,
        }
        Ok(Self { name, url, pool })
    }

    /// Drops the database, ending the connections still open to it (a
    /// benchmark's, once its processes are stopped). Tests leave theirs to
    /// `tests/run.sh`, which drops them at its next start.
    pub async fn drop_database(self) -> anyhow::Result<()> {
        self.pool.close().await;
        let admin_pool = PgPoolOptions::new()
            .max_connections(1)
            .connect(&admin_url())
            .await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            self.name
        )))
        .execute(&admin_pool)
        .await?;
        admin_pool.close().await;
        Ok(())
    }
}

/// A pool for a test's or a benchmark's own queries on `url`: the engine's
/// tables are on its `search_path`, so `workflows` reads `engine.workflows`.
pub async fn inspection_pool(url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    let options: sqlx::postgres::PgConnectOptions = url.parse()?;
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .connect_with(options.options([("search_path", "public,engine")]))
        .await?)
}

/// A binary of the workspace's debug build, built from the current sources
/// first: the first call in a test process runs `cargo build --workspace
/// --bins` (a no-op when nothing changed), so a test never spawns a stale
/// `widget-api` or `widget-worker`, whether it runs under `tests/run.sh` or
/// alone. Panics when the build fails: no test can mean anything then.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = std::process::Command::new(cargo)
            .args(["build", "--workspace", "--bins", "--quiet"])
            .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
            .status()
            .expect("running cargo build for the test binaries");
        assert!(status.success(), "cargo build --workspace --bins failed");
    });
    target_dir().join("debug").join(name)
}

/// The workspace's target directory.
pub fn target_dir() -> PathBuf {
    std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

fn log_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-logs");
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// A child process, killed (SIGKILL) when dropped. Its stderr goes to
/// `target/test-logs/`.
pub struct Proc {
    /// A label for messages.
    pub label: String,
    child: Child,
    /// Its log file.
    pub log: PathBuf,
}

impl Proc {
    /// Starts `program` with `env` added to the environment.
    pub fn spawn(
        label: &str,
        program: &Path,
        args: &[&str],
        env: &[(&str, String)],
    ) -> anyhow::Result<Self> {
        let log = log_dir().join(format!("{label}-{}.log", uuid::Uuid::new_v4().simple()));
        let stderr = std::fs::File::create(&log)?;
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true);
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {} (built? run tests/run.sh)", program.display()))?;
        Ok(Self {
            label: label.to_owned(),
            child,
            log,
        })
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Sends a signal (`"KILL"`, `"TERM"`, ...).
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()?;
        anyhow::ensure!(status.success(), "kill -{signal} {} failed", self.pid());
        Ok(())
    }

    /// Waits for the process to exit; its exit code (None if killed by a signal).
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<Option<i32>> {
        let status = tokio::time::timeout(timeout, self.child.wait())
            .await
            .with_context(|| format!("{} did not exit within {timeout:?}", self.label))??;
        Ok(status.code())
    }

    /// True once the process has exited (without waiting).
    pub fn has_exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// Reads stdout lines until one contains `needle`; returns that line.
    pub async fn read_line_containing(
        &mut self,
        needle: &str,
        timeout: Duration,
    ) -> anyhow::Result<String> {
        let stdout = self.child.stdout.as_mut().context("stdout not captured")?;
        let mut lines = BufReader::new(stdout).lines();
        let deadline = Instant::now() + timeout;
        loop {
            let line = tokio::time::timeout_at(deadline, lines.next_line())
                .await
                .with_context(|| {
                    format!(
                        "{} printed no `{needle}` within {timeout:?}; see {}",
                        self.label,
                        self.log.display()
                    )
                })??;
            match line {
                Some(line) if line.contains(needle) => return Ok(line),
                Some(_) => continue,
                None => bail!(
                    "{} exited before printing `{needle}`; see {}",
                    self.label,
                    self.log.display()
                ),
            }
        }
    }
}

/// Waits until `condition` returns true, checking every 25 ms, failing with
/// `what` after `timeout`.
pub async fn wait_until<F, Fut>(
    what: &str,
    timeout: Duration,
    mut condition: F,
) -> anyhow::Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    let started = Instant::now();
    loop {
        if condition().await? {
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The widget's units in stock.
pub async fn inventory(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT inventory::bigint FROM products WHERE id = 1")
            .fetch_one(pool)
            .await?,
    )
}

/// Workers in the fleet registry.
pub async fn live_workers(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM workers")
        .fetch_one(pool)
        .await?)
}

/// Waits until exactly `n` workers are in the fleet registry.
pub async fn wait_workers(pool: &PgPool, n: i64) -> anyhow::Result<()> {
    wait_until(
        &format!("{n} live workers"),
        Duration::from_secs(30),
        || async { Ok(live_workers(pool).await? == n) },
    )
    .await?;
    Ok(())
}

/// When workflow `id` first checkpointed a step on a worker other than
/// `not_by` after `after` (a takeover), if it has.
pub async fn first_step_elsewhere(
    pool: &PgPool,
    id: &str,
    not_by: &str,
    after: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<Option<chrono::DateTime<chrono::Utc>>> {
    Ok(sqlx::query_scalar(
        "SELECT min(finished_at) FROM workflow_steps WHERE workflow_id = $1 AND worker_id <> $2 AND finished_at > $3",
    )
    .bind(id)
    .bind(not_by)
    .bind(after)
    .fetch_one(pool)
    .await?)
}

/// Waits until workflow `id` checkpoints a step on a worker other than
/// `not_by` after `after`; returns how long after `after` that step committed.
pub async fn wait_step_elsewhere(
    pool: &PgPool,
    id: &str,
    not_by: &str,
    after: chrono::DateTime<chrono::Utc>,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    wait_until(
        &format!("{id}: a step on a worker other than {not_by}"),
        timeout,
        || async {
            Ok(first_step_elsewhere(pool, id, not_by, after)
                .await?
                .is_some())
        },
    )
    .await?;
    let first = first_step_elsewhere(pool, id, not_by, after)
        .await?
        .unwrap_or(after);
    Ok((first - after).to_std().unwrap_or_default())
}

/// Environment for a worker process in tests: quick polls and short waits.
pub fn worker_env(db: &TestDb, extra: &[(&str, &str)]) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("DATABASE_URL", db.url.clone()),
        ("DB_MAX_CONNECTIONS", "10".into()),
        (
            "RUST_LOG",
            "info,sqlx=warn,apalis=warn,apalis_core=warn,apalis_postgres=warn".into(),
        ),
        ("WORKER_POLL_INTERVAL", "100ms".into()),
        ("WORKER_REAP_INTERVAL", "100ms".into()),
        ("WORKER_CONCURRENCY", "16".into()),
        ("WORKER_DRAIN_TIMEOUT", "5000ms".into()),
        ("DEMO_PAYMENTS", "true".into()),
        // Every test client is 127.0.0.1: no per-client limits unless a
        // test sets them.
        ("CHECKOUT_RATE", "0".into()),
        ("MAX_PENDING_CHECKOUTS", "0".into()),
    ];
    for (key, value) in extra {
        let key: &'static str = Box::leak(key.to_string().into_boxed_str());
        env.retain(|(k, _)| *k != key);
        env.push((key, value.to_string()));
    }
    env
}

/// Starts a `widget-worker`.
pub fn spawn_store_worker(
    db: &TestDb,
    label: &str,
    extra: &[(&str, &str)],
) -> anyhow::Result<Proc> {
    Proc::spawn(label, &bin("widget-worker"), &[], &worker_env(db, extra))
}

/// A running `widget-api` on a free port.
pub struct Api {
    /// The process.
    pub proc: Proc,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// A client of its own.
    pub http: reqwest::Client,
}

impl Api {
    /// Starts the API on port 0 and reads the address it bound.
    pub async fn start(db: &TestDb, extra: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::launch(&bin("widget-api"), worker_env(db, extra)).await
    }

    /// Starts `program` (a `widget-api` build) with `env` on a free port and
    /// reads the address it bound from its banner.
    pub async fn launch(
        program: &Path,
        mut env: Vec<(&'static str, String)>,
    ) -> anyhow::Result<Self> {
        env.push(("API_ADDR", "127.0.0.1:0".into()));
        let mut proc = Proc::spawn("api", program, &[], &env)?;
        let line = proc
            .read_line_containing("listening on http://", Duration::from_secs(60))
            .await?;
        let base = line
            .split_whitespace()
            .last()
            .context("no address in the API's banner")?
            .to_owned();
        Ok(Self {
            proc,
            base,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(90))
                .build()?,
        })
    }

    /// `METHOD base+path` with an optional body; returns status and body text.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> anyhow::Result<(u16, String)> {
        self.call_with(method, path, body, &[]).await
    }

    /// [`Api::call`] with extra request headers.
    pub async fn call_with(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<(u16, String)> {
        let method = reqwest::Method::from_bytes(method.as_bytes())?;
        let mut request = self.http.request(method, format!("{}{}", self.base, path));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_owned());
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        Ok((status, response.text().await?))
    }

    /// POST with no body.
    pub async fn post(&self, path: &str) -> anyhow::Result<(u16, String)> {
        self.call("POST", path, None).await
    }

    /// GET, parsed as JSON.
    pub async fn get_json(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let (status, body) = self.call("GET", path, None).await?;
        anyhow::ensure!(status == 200, "GET {path}: {status} {body}");
        Ok(serde_json::from_str(&body)?)
    }
}

/// `POST /restock` to `inventory` units: a long load never runs out.
pub async fn restock(api: &Api, inventory: i64) -> anyhow::Result<()> {
    let body = format!(r#"{{"inventory": {inventory}}}"#);
    let (status, answer) = api.call("POST", "/restock", Some(&body)).await?;
    anyhow::ensure!(status == 200, "restock: {status} {answer}");
    Ok(())
}

/// A checkout under a fresh key; its payment id.
pub async fn checkout(api: &Api) -> anyhow::Result<String> {
    let key = uuid::Uuid::new_v4().simple().to_string();
    let (status, payment_id) = api.post(&format!("/checkout/{key}")).await?;
    anyhow::ensure!(status == 200, "checkout: {status} {payment_id}");
    Ok(payment_id)
}

/// The demo's payment webhook, `paid` or `failed`; the order id.
pub async fn pay(api: &Api, payment_id: &str, outcome: &str) -> anyhow::Result<i64> {
    let (status, order_id) = api
        .post(&format!("/payment_webhook/{payment_id}/{outcome}"))
        .await?;
    anyhow::ensure!(status == 200, "payment {outcome}: {status} {order_id}");
    Ok(order_id.parse()?)
}

/// One shopper's whole flow: checkout, paid, dispatched (watched through
/// `GET /order/{id}`). The order and how long the flow took.
pub async fn shopper_flow(api: &Api) -> anyhow::Result<(i64, Duration)> {
    let started = Instant::now();
    let payment_id = checkout(api).await?;
    let order_id = pay(api, &payment_id, "paid").await?;
    wait_until("dispatched", Duration::from_secs(60), || async {
        let order = api.get_json(&format!("/order/{order_id}")).await?;
        Ok(order["status"] == "DISPATCHED")
    })
    .await?;
    Ok((order_id, started.elapsed()))
}

/// The slowest of five [`shopper_flow`]s one after another: a flow's normal
/// latency, to compare the flows of a fault with.
pub async fn normal_flow_latency(api: &Api) -> anyhow::Result<Duration> {
    let mut normal = Duration::ZERO;
    for _ in 0..5 {
        normal = normal.max(shopper_flow(api).await?.1);
    }
    Ok(normal)
}

/// `clients` shoppers running [`shopper_flow`] back to back until `until`:
/// every flow's order and time, once all have stopped.
pub fn shoppers_until(
    api: std::sync::Arc<Api>,
    clients: usize,
    until: Instant,
) -> tokio::task::JoinHandle<anyhow::Result<Vec<(i64, Duration)>>> {
    tokio::spawn(async move {
        let tasks: Vec<_> = (0..clients)
            .map(|_| {
                let api = api.clone();
                tokio::spawn(async move {
                    let mut flows = Vec::new();
                    while Instant::now() < until {
                        flows.push(shopper_flow(&api).await?);
                    }
                    anyhow::Ok(flows)
                })
            })
            .collect();
        let mut flows = Vec::new();
        for task in tasks {
            flows.extend(task.await??);
        }
        Ok(flows)
    })
}

/// After a worker was taken out under load (`what`: how), prints the
/// flows' figures and fails unless every flow took at most 5 s beyond
/// `normal` and every dispatch applied each progress step once.
pub async fn assert_flows_taken_over(
    pool: &PgPool,
    flows: &[(i64, Duration)],
    normal: Duration,
    what: &str,
) -> anyhow::Result<()> {
    let slowest = flows
        .iter()
        .map(|(_, took)| *took)
        .max()
        .unwrap_or_default();
    eprintln!(
        "{} flows during {what}; slowest {slowest:?}, normal up to {normal:?}",
        flows.len()
    );
    anyhow::ensure!(
        slowest <= normal + Duration::from_secs(5),
        "a flow took {slowest:?}: more than 5 s beyond its normal {normal:?}"
    );
    for (order_id, _) in flows {
        assert_progress_applied_once(pool, *order_id).await?;
    }
    Ok(())
}

/// Waits until `proc`'s log holds `needle`.
pub async fn wait_for_log(proc: &Proc, needle: &str, timeout: Duration) -> anyhow::Result<()> {
    wait_until(
        &format!("{} logs {needle:?}", proc.label),
        timeout,
        || async { Ok(std::fs::read_to_string(&proc.log)?.contains(needle)) },
    )
    .await?;
    Ok(())
}

/// The outputs of an order's dispatch progress steps in step order: each is
/// the progress left after that step, so a dispatch that applied each step
/// once reads exactly [`EXPECTED_PROGRESS`]. A step applied twice shows as
/// a skipped number and a trailing `None` (the guard in the statement makes
/// a step after zero do nothing), which a count of checkpoints cannot see.
pub async fn progress_outputs(pool: &PgPool, order_id: i64) -> anyhow::Result<Vec<Option<i64>>> {
    let outputs: Vec<serde_json::Value> = sqlx::query_scalar(
        "SELECT output FROM workflow_steps WHERE workflow_id = $1 AND name = 'update_progress'
         ORDER BY step_seq",
    )
    .bind(store::dispatch_workflow_id(order_id))
    .fetch_all(pool)
    .await?;
    Ok(outputs.iter().map(serde_json::Value::as_i64).collect())
}

/// The progress left after each of a dispatch's ten steps, in order.
pub const EXPECTED_PROGRESS: [Option<i64>; 10] = [
    Some(9),
    Some(8),
    Some(7),
    Some(6),
    Some(5),
    Some(4),
    Some(3),
    Some(2),
    Some(1),
    Some(0),
];

/// Asserts that order `order_id`'s dispatch applied each progress step
/// exactly once: its checkpoints read 9, 8, ..., 0.
pub async fn assert_progress_applied_once(pool: &PgPool, order_id: i64) -> anyhow::Result<()> {
    let outputs = progress_outputs(pool, order_id).await?;
    anyhow::ensure!(
        outputs == EXPECTED_PROGRESS,
        "order {order_id}: the dispatch's progress steps left {outputs:?}, not 9, 8, ..., 0 \
         (a step applied twice or skipped)"
    );
    Ok(())
}
