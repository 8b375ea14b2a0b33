//! The chaos runner: drives checkout load against two APIs and a worker
//! fleet while killing workers (SIGKILL, SIGTERM, crash endpoint), killing
//! and restarting an API, restarting PostgreSQL and rescaling the fleet,
//! with a small stock that runs out and is restocked; then waits for quiet
//! and checks that it did its work (enough flows of every kind, every kind
//! of kill, out-of-stock answers) and that nothing was lost, charged twice,
//! applied twice or leaked.
//!
//!   cargo run -p widget-tests --bin chaos -- --duration 60 --workers 3
//!
//! It runs its own private PostgreSQL cluster (from the installed binaries)
//! because it must be able to restart it. Every check prints one line,
//! `  [pass] <name>` or `  [FAIL] <name>` (with the offending rows below);
//! exit status 1 when any check fails.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use clap::Parser;
use harness::postgres::{PrivatePostgres, free_port, is_root};
use harness::{Proc, bin, wait_until};
use rand::Rng;
use rand::seq::{IndexedRandom, SliceRandom};
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::sync::watch;

#[derive(Parser, Clone)]
#[command(
    about = "Chaos test of Widget Store: kills everything under load, then checks the work done and the invariants"
)]
struct Args {
    /// Seconds of chaos.
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// Worker processes in steady state (scaled to 2x, 1 and back during the run).
    #[arg(long, default_value_t = 3)]
    workers: usize,
    /// Mean pause between two chaos actions.
    #[arg(long, default_value_t = 3000)]
    kill_every_ms: u64,
    /// Concurrent load-generating clients.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Units in stock at the start (small, so that it runs out).
    #[arg(long, default_value_t = 100)]
    stock: i32,
    /// Units added by each restock (one about a second after the stock reaches 0).
    #[arg(long, default_value_t = 100)]
    restock: i32,
    /// Skip the PostgreSQL restart.
    #[arg(long)]
    no_db_restart: bool,
    /// Use release binaries (cargo build --release --bins).
    #[arg(long)]
    release: bool,
    /// Also write the summary here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// At least this many checkouts answered with a payment id
    /// [default: scaled from the duration].
    #[arg(long)]
    min_checkouts: Option<u64>,
    /// At least this many flows paid (webhook answered 200) [default: scaled].
    #[arg(long)]
    min_paid: Option<u64>,
    /// At least this many flows failed (webhook answered 200) [default: scaled].
    #[arg(long)]
    min_failed: Option<u64>,
    /// At least this many flows that never paid [default: scaled].
    #[arg(long)]
    min_never_paid: Option<u64>,
    /// At least this many checkouts answered 409 out_of_stock [default: scaled].
    #[arg(long)]
    min_out_of_stock: Option<u64>,
    /// At least this many webhooks answered 409 checkout_expired (flows that
    /// pay after their payment window closed) [default: scaled].
    #[arg(long)]
    min_expired: Option<u64>,
    /// At least this many restocks.
    #[arg(long, default_value_t = 1)]
    min_restocks: u64,
}

/// Each minimum's default per 60 s of chaos: about a fifth of what a 60 s
/// debug run with the default flags achieves on a shared 2-core machine
/// (2,900 to 3,900 checkouts answered with a payment id, 2,000 to 2,700
/// paid, 590 to 810 failed, 400 to 480 never paid, 2,400 to 4,000 out of
/// stock across 17 to 23 restocks, 106 checkout_expired), so a healthy run
/// passes comfortably and an idle one cannot.
const MIN_PER_MINUTE: Minimums = Minimums {
    checkouts: 600,
    paid: 400,
    failed: 120,
    never_paid: 90,
    out_of_stock: 500,
    expired: 20,
};

struct Minimums {
    checkouts: u64,
    paid: u64,
    failed: u64,
    never_paid: u64,
    out_of_stock: u64,
    expired: u64,
}

impl Args {
    fn minimums(&self) -> Minimums {
        // Never below 1: a run of 0 s must not pass on minimums of 0.
        let scaled = |per_minute: u64| (per_minute * self.duration / 60).max(1);
        Minimums {
            checkouts: self
                .min_checkouts
                .unwrap_or_else(|| scaled(MIN_PER_MINUTE.checkouts)),
            paid: self.min_paid.unwrap_or_else(|| scaled(MIN_PER_MINUTE.paid)),
            failed: self
                .min_failed
                .unwrap_or_else(|| scaled(MIN_PER_MINUTE.failed)),
            never_paid: self
                .min_never_paid
                .unwrap_or_else(|| scaled(MIN_PER_MINUTE.never_paid)),
            out_of_stock: self
                .min_out_of_stock
                .unwrap_or_else(|| scaled(MIN_PER_MINUTE.out_of_stock)),
            expired: self
                .min_expired
                .unwrap_or_else(|| scaled(MIN_PER_MINUTE.expired)),
        }
    }
}

/// How long a checkout waits for its payment.
const PAYMENT_TIMEOUT: Duration = Duration::from_millis(4000);

// ------------------------------------------------------------------ the fleet

struct Fleet {
    database_url: String,
    release: bool,
    /// The secret of the provider's signed webhooks.
    webhook_secret: String,
    /// The operator's admin token.
    admin_token: String,
    workers: Vec<Proc>,
    draining: Vec<Proc>,
    apis: Vec<(u16, Option<Proc>)>,
}

impl Fleet {
    fn binary(&self, name: &str) -> PathBuf {
        if self.release {
            harness::target_dir().join("release").join(name)
        } else {
            bin(name)
        }
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("DATABASE_URL", self.database_url.clone()),
            ("DB_MAX_CONNECTIONS", "12".into()),
            ("CHAOS", "true".into()),
            ("DEMO_PAYMENTS", "true".into()),
            // Every client here is 127.0.0.1: no per-client limits.
            ("CHECKOUT_RATE", "0".into()),
            ("MAX_PENDING_CHECKOUTS", "0".into()),
            ("PAYMENT_WEBHOOK_SECRETS", self.webhook_secret.clone()),
            ("ADMIN_TOKEN", format!("chaos={}", self.admin_token)),
            (
                "PAYMENT_TIMEOUT",
                format!("{}ms", PAYMENT_TIMEOUT.as_millis()),
            ),
            ("DISPATCH_INTERVAL", "100ms".into()),
            ("EVENT_WAIT", "15000ms".into()),
            ("WORKER_CONCURRENCY", "16".into()),
            ("WORKER_DRAIN_TIMEOUT", "5000ms".into()),
            ("RUST_LOG", "warn,shared=info".into()),
        ]
    }

    fn spawn_worker(&mut self) -> anyhow::Result<()> {
        let proc = Proc::spawn(
            "chaos-worker",
            &self.binary("widget-worker"),
            &[],
            &self.env(),
        )?;
        self.workers.push(proc);
        Ok(())
    }

    async fn spawn_api(&mut self, index: usize) -> anyhow::Result<()> {
        let port = self.apis[index].0;
        let mut env = self.env();
        env.push(("API_ADDR", format!("127.0.0.1:{port}")));
        let mut proc = Proc::spawn("chaos-api", &self.binary("widget-api"), &[], &env)?;
        proc.read_line_containing("listening on", Duration::from_secs(60))
            .await?;
        self.apis[index].1 = Some(proc);
        Ok(())
    }

    /// Replaces exited workers up to `target`, drains extras, forgets the drained.
    fn keep(&mut self, target: usize) -> anyhow::Result<usize> {
        let before = self.workers.len();
        self.workers.retain_mut(|w| !w.has_exited());
        let crashed = before - self.workers.len();
        self.draining.retain_mut(|w| !w.has_exited());
        while self.workers.len() > target {
            let w = self.workers.pop().expect("non-empty");
            let _ = w.signal("TERM");
            self.draining.push(w);
        }
        while self.workers.len() < target {
            self.spawn_worker()?;
        }
        Ok(crashed)
    }

    fn bases(&self) -> Vec<String> {
        self.apis
            .iter()
            .map(|(port, _)| format!("http://127.0.0.1:{port}"))
            .collect()
    }
}

// ------------------------------------------------------------------ records

#[derive(Default)]
struct Records {
    flows: u64,
    checkouts_ok: u64,
    out_of_stock: u64,
    paid: u64,
    failed: u64,
    never_paid: u64,
    /// Flows that pay only after their payment window closed.
    paid_late: u64,
    /// Flows paid through the provider's signed webhook (answered 2xx).
    signed: u64,
    /// Checkouts an operator cancelled through the admin API (answered 202).
    admin_cancelled: Vec<String>,
    webhook_409: BTreeMap<String, u64>,
    /// Every webhook answered 409 checkout_expired: (payment id, answered at).
    expired: Vec<(String, DateTime<Utc>)>,
    retries: u64,
    errors: BTreeMap<String, u64>,
    server_errors: Vec<(DateTime<Utc>, u16, String)>,
    key_to_payment: HashMap<String, String>,
    payment_to_order: HashMap<String, String>,
    inconsistencies: Vec<String>,
    recent_keys: Vec<String>,
}

struct Shared {
    http: reqwest::Client,
    bases: Vec<String>,
    webhook_secret: String,
    admin_token: String,
    records: Mutex<Records>,
    /// The late payments still to be sent (awaited before the checks).
    late: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

enum Answer {
    Ok(u16, String),
    Retry,
}

/// The `error.code` of an API error body.
fn error_code(body: &str) -> Option<String> {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
}

impl Shared {
    /// One POST to a random API; transport errors, 502-504 and 503 are "retry".
    async fn post(&self, path: &str) -> Answer {
        self.post_with(path, None).await
    }

    /// [`Shared::post`], with the admin token when `admin`.
    async fn post_with(&self, path: &str, bearer: Option<&str>) -> Answer {
        let base = self.bases.choose(&mut rand::rng()).expect("apis").clone();
        let mut request = self.http.post(format!("{base}{path}"));
        if let Some(token) = bearer {
            request = request.bearer_auth(token);
        }
        match request.send().await {
            Err(e) => {
                let kind = if e.is_connect() {
                    "connect"
                } else if e.is_timeout() {
                    "timeout"
                } else {
                    "transport"
                };
                self.note_error(kind);
                Answer::Retry
            }
            Ok(response) => {
                let status = response.status().as_u16();
                let body = response.text().await.unwrap_or_default();
                if status >= 500 {
                    let code = error_code(&body).unwrap_or_default();
                    self.note_error(&format!("{status} {code}"));
                    self.records
                        .lock()
                        .unwrap()
                        .server_errors
                        .push((Utc::now(), status, code));
                    return Answer::Retry;
                }
                Answer::Ok(status, body)
            }
        }
    }

    fn note_error(&self, kind: &str) {
        let mut r = self.records.lock().unwrap();
        *r.errors.entry(kind.to_owned()).or_default() += 1;
        r.retries += 1;
    }

    /// One signed provider delivery, signed anew and retried as a provider
    /// does until an API answers it with anything but a transport error or
    /// a 5xx (a refusal is a bug the checks report).
    async fn deliver_signed(
        &self,
        id: &str,
        kind: &str,
        payment_id: &str,
        deadline: Instant,
    ) -> Option<(u16, String)> {
        let body = harness::provider::event_body(kind, payment_id, "99.99", "USD");
        while Instant::now() < deadline {
            let delivery =
                harness::provider::Delivery::signed(&self.webhook_secret, id, body.clone());
            let base = self.bases.choose(&mut rand::rng()).expect("apis").clone();
            let sent = harness::provider::post(&self.http, &base, &delivery).await;
            match sent {
                Ok(response) if response.status().as_u16() < 500 => {
                    let status = response.status().as_u16();
                    let body = response.text().await.unwrap_or_default();
                    if status != 200 {
                        let mut r = self.records.lock().unwrap();
                        r.inconsistencies
                            .push(format!("signed delivery {id} answered {status} {body}"));
                    }
                    return Some((status, body));
                }
                Ok(response) => {
                    let status = response.status().as_u16();
                    let body = response.text().await.unwrap_or_default();
                    let code = error_code(&body).unwrap_or_default();
                    self.note_error(&format!("signed {status} {code}"));
                    self.records
                        .lock()
                        .unwrap()
                        .server_errors
                        .push((Utc::now(), status, code));
                }
                Err(_) => self.note_error("signed transport"),
            }
            let pause = rand::rng().random_range(100..400);
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
        self.note_error("gave up");
        None
    }

    /// Retries with the same idempotency key, as a real client would.
    async fn post_until_answered(&self, path: &str, deadline: Instant) -> Option<(u16, String)> {
        self.post_until_answered_with(path, None, deadline).await
    }

    async fn post_until_answered_with(
        &self,
        path: &str,
        bearer: Option<&str>,
        deadline: Instant,
    ) -> Option<(u16, String)> {
        while Instant::now() < deadline {
            match self.post_with(path, bearer).await {
                Answer::Ok(status, body) => return Some((status, body)),
                Answer::Retry => {
                    let pause = rand::rng().random_range(100..400);
                    tokio::time::sleep(Duration::from_millis(pause)).await
                }
            }
        }
        self.note_error("gave up");
        None
    }

    fn record_pair(
        &self,
        map: fn(&mut Records) -> &mut HashMap<String, String>,
        what: &str,
        from: &str,
        to: &str,
    ) {
        let mut r = self.records.lock().unwrap();
        let existing = map(&mut r)
            .entry(from.to_owned())
            .or_insert_with(|| to.to_owned())
            .clone();
        if existing != to {
            r.inconsistencies
                .push(format!("{what} {from} answered {existing} and then {to}"));
        }
    }

    /// Records a webhook's answer; `first` counts a 200 as a paid or failed
    /// flow. Returns whether it was a 409.
    fn record_webhook(
        &self,
        payment_id: &str,
        status: &str,
        first: bool,
        code: u16,
        body: &str,
    ) -> bool {
        match code {
            200 => {
                self.record_pair(|r| &mut r.payment_to_order, "payment", payment_id, body);
                if first {
                    let mut r = self.records.lock().unwrap();
                    if status == "paid" {
                        r.paid += 1
                    } else {
                        r.failed += 1
                    }
                }
                false
            }
            409 => {
                let answered = Utc::now();
                let code = error_code(body).unwrap_or_else(|| "409".into());
                let mut r = self.records.lock().unwrap();
                if code == "checkout_expired" {
                    r.expired.push((payment_id.to_owned(), answered));
                }
                *r.webhook_409.entry(code).or_default() += 1;
                true
            }
            other => {
                self.note_error(&format!("webhook {other}"));
                false
            }
        }
    }
}

async fn one_flow(shared: &Arc<Shared>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let key = {
        let mut r = shared.records.lock().unwrap();
        r.flows += 1;
        let reuse = rand::rng().random_bool(0.1) && !r.recent_keys.is_empty();
        if reuse {
            r.recent_keys
                .choose(&mut rand::rng())
                .cloned()
                .expect("non-empty")
        } else {
            let key = uuid::Uuid::new_v4().to_string();
            r.recent_keys.push(key.clone());
            if r.recent_keys.len() > 200 {
                r.recent_keys.remove(0);
            }
            key
        }
    };
    let Some((status, payment_id)) = shared
        .post_until_answered(&format!("/checkout/{key}"), deadline)
        .await
    else {
        return;
    };
    match status {
        200 => {}
        409 if error_code(&payment_id).as_deref() == Some("out_of_stock") => {
            shared.records.lock().unwrap().out_of_stock += 1;
            return;
        }
        other => {
            shared.note_error(&format!("checkout {other}"));
            return;
        }
    }
    shared.records.lock().unwrap().checkouts_ok += 1;
    shared.record_pair(|r| &mut r.key_to_payment, "key", &key, &payment_id);

    let roll: f64 = rand::rng().random();
    if roll < 0.15 {
        // Through the provider's signed webhook: a success, after a failure
        // for one in five (a refund due), each delivery sent twice at once
        // for one in ten and redelivered for one in seven.
        let kinds: &[&str] = if roll < 0.03 {
            &["payment.failed", "payment.succeeded"]
        } else {
            &["payment.succeeded"]
        };
        for kind in kinds {
            let id = format!("msg_{}", uuid::Uuid::new_v4().simple());
            let copies = if rand::rng().random_bool(0.1) { 2 } else { 1 };
            let answers = futures::future::join_all(
                (0..copies).map(|_| shared.deliver_signed(&id, kind, &payment_id, deadline)),
            )
            .await;
            if rand::rng().random_bool(0.15) {
                shared
                    .deliver_signed(&id, kind, &payment_id, deadline)
                    .await;
            }
            if answers.iter().flatten().any(|(code, _)| *code == 200)
                && *kind == "payment.succeeded"
            {
                shared.records.lock().unwrap().signed += 1;
            }
        }
        return;
    }
    let roll = (roll - 0.15) / 0.85;
    let statuses: &[&str] = if roll < 0.55 {
        &["paid"]
    } else if roll < 0.75 {
        &["failed"]
    } else if roll < 0.84 {
        shared.records.lock().unwrap().never_paid += 1;
        &[]
    } else if roll < 0.87 {
        // An operator cancels it through the admin API instead: its order
        // is cancelled and its unit returns (a reused key's checkout may
        // have finished already: 409).
        let path = format!("/admin/workflows/{payment_id}/cancel");
        let token = Some(shared.admin_token.as_str());
        match shared
            .post_until_answered_with(&path, token, deadline)
            .await
        {
            Some((202, _)) => shared
                .records
                .lock()
                .unwrap()
                .admin_cancelled
                .push(payment_id),
            Some((409, _)) | None => {}
            Some((other, body)) => shared.note_error(&format!("admin cancel {other} {body}")),
        }
        return;
    } else if roll < 0.9 {
        // Pays after the window closed (its checkout should have timed out
        // and answer 409 checkout_expired), without holding this client.
        shared.records.lock().unwrap().paid_late += 1;
        let late = PAYMENT_TIMEOUT + Duration::from_millis(rand::rng().random_range(500..2000));
        let (shared2, payment_id) = (shared.clone(), payment_id.clone());
        let task = tokio::spawn(async move {
            tokio::time::sleep(late).await;
            let path = format!("/payment_webhook/{payment_id}/paid");
            let deadline = Instant::now() + Duration::from_secs(60);
            if let Some((code, body)) = shared2.post_until_answered(&path, deadline).await {
                shared2.record_webhook(&payment_id, "paid", false, code, &body);
            }
        });
        shared.late.lock().unwrap().push(task);
        &[]
    } else {
        &["paid", "failed"]
    };
    for (i, status) in statuses.iter().enumerate() {
        let path = format!("/payment_webhook/{payment_id}/{status}");
        let copies = if rand::rng().random_bool(0.1) { 2 } else { 1 };
        let answers = futures::future::join_all(
            (0..copies).map(|_| shared.post_until_answered(&path, deadline)),
        )
        .await;
        let mut twice = rand::rng().random_bool(0.15);
        for (code, body) in answers.into_iter().flatten() {
            if shared.record_webhook(&payment_id, status, i == 0, code, &body) {
                twice = false;
            }
        }
        if twice && let Some((code, body)) = shared.post_until_answered(&path, deadline).await {
            shared.record_webhook(&payment_id, status, false, code, &body);
        }
    }
}

// ------------------------------------------------------------------ restocks

/// Whenever the stock has reached 0, waits about a second (shoppers get
/// 409 out_of_stock meanwhile), then adds `amount` units. Each restock is
/// one transaction that also records itself in `chaos_restocks`, so the
/// stock invariant stays exact when a commit's answer is lost across the
/// database restart. Runs until `stop`; errors (the database down) retry.
async fn restocker(pool: PgPool, amount: i32, mut stop: watch::Receiver<bool>) {
    while !*stop.borrow() {
        let inventory: Result<i32, _> =
            sqlx::query_scalar("SELECT inventory FROM products WHERE id = $1")
                .bind(store::WIDGET_ID)
                .fetch_one(&pool)
                .await;
        let pause = if matches!(inventory, Ok(0)) {
            Duration::from_millis(rand::rng().random_range(800..1200))
        } else {
            Duration::from_millis(100)
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.changed() => break,
        }
        if matches!(inventory, Ok(0)) {
            let _ = restock(&pool, amount).await;
        }
    }
}

async fn restock(pool: &PgPool, amount: i32) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query("UPDATE products SET inventory = inventory + $1 WHERE id = $2")
        .bind(amount)
        .bind(store::WIDGET_ID)
        .execute(&mut *tx)
        .await?;
    sqlx::query("INSERT INTO chaos_restocks (amount, at) VALUES ($1, now())")
        .bind(amount)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

// ------------------------------------------------------------------ the run

/// A chaos action other than the database restart.
#[derive(Clone, Copy, Debug)]
enum Action {
    WorkerKill,
    WorkerTerm,
    /// SIGSTOP, then SIGCONT a few seconds later: a hung worker.
    WorkerFreeze,
    CrashEndpoint,
    ApiKill,
}

/// Actions are drawn from shuffled decks rather than picked independently,
/// so every kind comes up within each run of six actions: a 60 s run (an
/// action every ~3 s) deals several decks.
const DECK: [Action; 6] = [
    Action::WorkerKill,
    Action::WorkerKill,
    Action::WorkerTerm,
    Action::WorkerFreeze,
    Action::CrashEndpoint,
    Action::ApiKill,
];

#[derive(Default)]
struct Deck(Vec<Action>);

impl Deck {
    fn draw(&mut self) -> Action {
        if self.0.is_empty() {
            self.0 = DECK.to_vec();
            self.0.shuffle(&mut rand::rng());
        }
        self.0.pop().expect("a full deck")
    }

    /// An action that could not be done now goes back into the deck.
    fn put_back(&mut self, action: Action) {
        let at = rand::rng().random_range(0..=self.0.len());
        self.0.insert(at, action);
    }
}

#[derive(Default)]
struct Kills {
    sigkill: u64,
    sigterm: u64,
    sigstop: u64,
    crash_endpoint: u64,
    api_kill: u64,
    db_restart: u64,
    crashed_noticed: u64,
    /// (victim worker id, kill time, workflows it owned)
    victims: Vec<(String, DateTime<Utc>, Vec<String>)>,
    db_down: Option<(DateTime<Utc>, DateTime<Utc>)>,
}

async fn owned_by(pool: &PgPool, pid: u32) -> Option<(String, Vec<String>)> {
    let id: String = sqlx::query_scalar("SELECT id FROM workers WHERE pid = $1")
        .bind(pid as i32)
        .fetch_optional(pool)
        .await
        .ok()??;
    let owned: Vec<String> =
        sqlx::query_scalar("SELECT id FROM workflows WHERE owner = $1 AND status = 'running'")
            .bind(&id)
            .fetch_all(pool)
            .await
            .ok()?;
    Some((id, owned))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let minimums = args.minimums();
    println!(
        "chaos: {} s, {} workers, 2 APIs, an action every ~{} ms, {} clients, stock {} (restocks of {})",
        args.duration, args.workers, args.kill_every_ms, args.clients, args.stock, args.restock
    );
    let run_started = Instant::now();
    let pg = PrivatePostgres::create()?;
    let admin = PgPoolOptions::new()
        .max_connections(2)
        .connect(&pg.url("postgres"))
        .await?;
    sqlx::query("CREATE DATABASE widget_chaos")
        .execute(&admin)
        .await?;
    admin.close().await;
    let database_url = pg.url("widget_chaos");
    let pool = harness::inspection_pool(&database_url, 4).await?;
    store::db::migrate(&pool).await?;
    sqlx::query("UPDATE products SET inventory = $1 WHERE id = $2")
        .bind(args.stock)
        .bind(store::WIDGET_ID)
        .execute(&pool)
        .await?;
    // The runner's own record of its restocks (the stock invariant's).
    sqlx::query("CREATE TABLE chaos_restocks (amount integer NOT NULL, at timestamptz NOT NULL)")
        .execute(&pool)
        .await?;

    let mut fleet = Fleet {
        database_url,
        release: args.release,
        webhook_secret: harness::provider::new_secret(),
        admin_token: format!("chaos-admin-{}", uuid::Uuid::new_v4().simple()),
        workers: Vec::new(),
        draining: Vec::new(),
        apis: vec![(free_port()?, None), (free_port()?, None)],
    };
    fleet.spawn_api(0).await?;
    fleet.spawn_api(1).await?;
    fleet.keep(args.workers)?;
    wait_until("workers registered", Duration::from_secs(60), || async {
        Ok(sqlx::query_scalar::<_, i64>("SELECT count(*) FROM workers")
            .fetch_one(&pool)
            .await?
            == args.workers as i64)
    })
    .await?;

    let shared = Arc::new(Shared {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?,
        bases: fleet.bases(),
        webhook_secret: fleet.webhook_secret.clone(),
        admin_token: fleet.admin_token.clone(),
        records: Mutex::new(Records::default()),
        late: Mutex::new(Vec::new()),
    });
    let (stop_load, load_stopped) = watch::channel(false);
    let clients: Vec<_> = (0..args.clients)
        .map(|_| {
            let shared = shared.clone();
            let stopped = load_stopped.clone();
            tokio::spawn(async move {
                while !*stopped.borrow() {
                    one_flow(&shared).await;
                }
            })
        })
        .collect();
    let restocks = tokio::spawn(restocker(pool.clone(), args.restock, load_stopped.clone()));

    // Chaos.
    let started = Instant::now();
    let total = Duration::from_secs(args.duration);
    let mut kills = Kills::default();
    let mut deck = Deck::default();
    let mut db_restarted = args.no_db_restart;
    while started.elapsed() < total {
        let pause = rand::rng().random_range(args.kill_every_ms / 2..=args.kill_every_ms * 3 / 2);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let progress = started.elapsed().as_secs_f64() / total.as_secs_f64();
        let target = match progress {
            p if p < 0.25 => args.workers,
            p if p < 0.5 => args.workers * 2,
            p if p < 0.75 => 1,
            _ => args.workers,
        };
        kills.crashed_noticed += fleet.keep(target)? as u64;
        if !db_restarted && progress >= 0.4 {
            db_restarted = true;
            let down = Utc::now();
            println!("  restarting PostgreSQL (immediate stop, then start)");
            pg.stop_immediate()?;
            tokio::time::sleep(Duration::from_secs(2)).await;
            pg.start()?;
            kills.db_restart += 1;
            kills.db_down = Some((down, Utc::now()));
            continue;
        }
        let action = deck.draw();
        match action {
            Action::WorkerKill | Action::WorkerTerm | Action::WorkerFreeze
                if fleet.workers.is_empty() =>
            {
                deck.put_back(action)
            }
            Action::WorkerKill => {
                let index = rand::rng().random_range(0..fleet.workers.len());
                let pid = fleet.workers[index].pid();
                let owned = owned_by(&pool, pid).await;
                let victim = fleet.workers.remove(index);
                victim.signal("KILL")?;
                let at = Utc::now();
                drop(victim);
                kills.sigkill += 1;
                if let Some((id, owned)) = owned {
                    kills.victims.push((id, at, owned));
                }
            }
            Action::WorkerTerm => {
                let index = rand::rng().random_range(0..fleet.workers.len());
                let victim = fleet.workers.remove(index);
                victim.signal("TERM")?;
                fleet.draining.push(victim);
                kills.sigterm += 1;
            }
            Action::WorkerFreeze => {
                // Frozen past the stale bound (3 s), so its workflows are
                // taken over, then woken while the load goes on.
                let index = rand::rng().random_range(0..fleet.workers.len());
                let victim = &fleet.workers[index];
                victim.signal("STOP")?;
                kills.sigstop += 1;
                let pid = victim.pid().to_string();
                let frozen_for = rand::rng().random_range(4_000..=8_000);
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(frozen_for)).await;
                    let _ = std::process::Command::new("kill")
                        .args(["-CONT", &pid])
                        .status();
                });
            }
            Action::CrashEndpoint => {
                // Counts only when a worker was told to crash (202); tried
                // again later otherwise.
                if let Answer::Ok(202, _) = shared.post("/crash_application").await {
                    kills.crash_endpoint += 1;
                } else {
                    deck.put_back(action);
                }
            }
            Action::ApiKill => {
                let index = rand::rng().random_range(0..fleet.apis.len());
                if let Some(api) = fleet.apis[index].1.take() {
                    api.signal("KILL")?;
                    drop(api);
                    kills.api_kill += 1;
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    fleet.spawn_api(index).await?;
                } else {
                    deck.put_back(action);
                }
            }
        }
        fleet.keep(target)?;
    }
    println!(
        "  chaos over after {:.1?}; stopping the load",
        started.elapsed()
    );

    // Quiet.
    let _ = stop_load.send(true);
    for client in clients {
        let _ = tokio::time::timeout(Duration::from_secs(90), client).await;
    }
    let _ = restocks.await;
    let late: Vec<_> = std::mem::take(&mut *shared.late.lock().unwrap());
    for task in late {
        let _ = tokio::time::timeout(Duration::from_secs(90), task).await;
    }
    fleet.keep(args.workers)?;
    let quiet_started = Instant::now();
    let quiet = wait_until(
        "every workflow finished",
        Duration::from_secs(180),
        || async { fleet_keep_quiet(&pool).await },
    )
    .await;
    let time_to_quiet = quiet_started.elapsed();

    // Takeover times.
    let mut takeovers = Vec::new();
    for (victim, at, owned) in &kills.victims {
        for id in owned {
            if let Some(first) = harness::first_step_elsewhere(&pool, id, victim, *at).await? {
                takeovers.push((first - *at).to_std().unwrap_or_default());
            }
        }
    }
    takeovers.sort();

    let (restock_count, restock_units): (i64, i64) =
        sqlx::query_as("SELECT count(*), coalesce(sum(amount), 0)::bigint FROM chaos_restocks")
            .fetch_one(&pool)
            .await?;
    let mut checks = vec![(
        format!("1 every workflow finished (quiet after {time_to_quiet:.1?}, at most 180 s)"),
        match &quiet {
            Ok(_) => vec![],
            Err(e) => vec![format!("{e:#}")],
        },
    )];
    checks.extend(invariants(&pool, &shared, &kills, args.stock).await?);
    let records = shared.records.lock().unwrap();
    let work = work_checks(&args, &minimums, &records, &kills, restock_count as u64);
    let pct = |p: f64| -> String {
        if takeovers.is_empty() {
            return "-".into();
        }
        let i = ((p / 100.0) * (takeovers.len() - 1) as f64).round() as usize;
        format!("{:.0?}", takeovers[i])
    };
    println!(
        "\nflows: {} ({} checkouts answered, {} out of stock; paid {}, failed {}, never paid {}, paid late {})",
        records.flows,
        records.checkouts_ok,
        records.out_of_stock,
        records.paid,
        records.failed,
        records.never_paid,
        records.paid_late
    );
    println!(
        "stock: {} at the start, {restock_count} restocks adding {restock_units} units",
        args.stock
    );
    println!("webhook 409s: {:?}", records.webhook_409);
    println!(
        "kills: SIGKILL {}, SIGTERM {}, SIGSTOP {}, crash endpoint {}, API kills {}, PostgreSQL restarts {}, crashed workers replaced {}",
        kills.sigkill,
        kills.sigterm,
        kills.sigstop,
        kills.crash_endpoint,
        kills.api_kill,
        kills.db_restart,
        kills.crashed_noticed
    );
    println!(
        "client retries: {} ; errors by kind: {:?}",
        records.retries, records.errors
    );
    println!(
        "takeover after SIGKILL ({} workflows): p50 {} p99 {} max {}",
        takeovers.len(),
        pct(50.0),
        pct(99.0),
        takeovers
            .last()
            .map(|d| format!("{d:.0?}"))
            .unwrap_or("-".into())
    );
    println!(
        "time to quiet: {time_to_quiet:.1?}{}; whole run {:.1?}",
        if quiet.is_err() { " (NOT QUIET)" } else { "" },
        run_started.elapsed()
    );
    println!("\nwork done:");
    let mut failed = print_checks(&work);
    println!("invariants:");
    failed |= print_checks(&checks);
    if let Some(path) = &args.json {
        let listed = |checks: &[Check]| {
            checks
                .iter()
                .map(|(n, o)| json!({"name": n, "pass": o.is_empty(), "offending": o}))
                .collect::<Vec<_>>()
        };
        let summary = json!({
            "flows": records.flows, "checkouts": records.checkouts_ok, "out_of_stock": records.out_of_stock,
            "paid": records.paid, "failed": records.failed, "never_paid": records.never_paid,
            "paid_late": records.paid_late,
            "webhook_409": records.webhook_409,
            "stock": { "initial": args.stock, "restocks": restock_count, "restocked_units": restock_units },
            "kills": { "sigkill": kills.sigkill, "sigterm": kills.sigterm, "sigstop": kills.sigstop, "crash_endpoint": kills.crash_endpoint,
                       "api": kills.api_kill, "db_restart": kills.db_restart },
            "errors": records.errors,
            "takeover_ms": takeovers.iter().map(|d| d.as_millis() as u64).collect::<Vec<_>>(),
            "time_to_quiet_ms": time_to_quiet.as_millis() as u64,
            "work": listed(&work),
            "invariants": listed(&checks),
            "pass": !failed,
        });
        std::fs::write(path, serde_json::to_string_pretty(&summary)?)?;
    }
    drop(records);
    // Stop the processes and the private cluster before exiting:
    // `process::exit` runs no destructors.
    drop(fleet);
    drop(pool);
    let mut pg = pg;
    pg.keep = failed;
    let (kept, port, bin) = (pg.dir.clone(), pg.port, pg.bin.clone());
    drop(pg);
    if failed {
        println!(
            "chaos: the stopped cluster is kept for a post-mortem in {dir}; start it with \
             {runuser}{bin}/pg_ctl -D {dir}/data -o \"-p {port} -k {dir}\" start, then \
             psql -h 127.0.0.1 -p {port} -U postgres widget_chaos",
            dir = kept.display(),
            bin = bin.display(),
            runuser = if is_root() {
                "runuser -u postgres -- "
            } else {
                ""
            },
        );
        println!("chaos: CHECKS FAILED");
        std::process::exit(1);
    }
    println!("chaos: the work was done and all invariants hold");
    Ok(())
}

/// Prints each check as `  [pass] <name>` or `  [FAIL] <name>` with its
/// offending rows below; returns whether any failed.
fn print_checks(checks: &[Check]) -> bool {
    let mut failed = false;
    for (name, offending) in checks {
        let ok = offending.is_empty();
        failed |= !ok;
        println!("  [{}] {name}", if ok { "pass" } else { "FAIL" });
        for row in offending.iter().take(10) {
            println!("        {row}");
        }
        if offending.len() > 10 {
            println!("        ... and {} more", offending.len() - 10);
        }
    }
    failed
}

/// The checks that the run did its work: enough flows of every kind,
/// every kind of kill, the database restart exactly once.
fn work_checks(
    args: &Args,
    min: &Minimums,
    records: &Records,
    kills: &Kills,
    restocks: u64,
) -> Vec<Check> {
    let at_least = |what: &str, measured: u64, min: u64| -> Check {
        (
            format!("{what}: {measured} (at least {min})"),
            if measured >= min {
                vec![]
            } else {
                vec![format!("measured {measured}, below the minimum {min}")]
            },
        )
    };
    let restarts = if args.no_db_restart { 0 } else { 1 };
    vec![
        at_least(
            "work: checkouts answered with a payment id",
            records.checkouts_ok,
            min.checkouts,
        ),
        at_least("work: flows paid", records.paid, min.paid),
        at_least("work: flows failed", records.failed, min.failed),
        at_least("work: flows never paid", records.never_paid, min.never_paid),
        at_least(
            "work: checkouts cancelled by an operator through the admin API",
            records.admin_cancelled.len() as u64,
            (args.duration / 4).max(1),
        ),
        at_least(
            "work: flows paid through the signed webhook",
            records.signed,
            args.duration.max(1),
        ),
        at_least(
            "work: checkouts answered 409 out_of_stock",
            records.out_of_stock,
            min.out_of_stock,
        ),
        at_least(
            "work: webhooks answered 409 checkout_expired",
            records.expired.len() as u64,
            min.expired,
        ),
        at_least("work: restocks", restocks, args.min_restocks),
        at_least("kills: worker SIGKILLs", kills.sigkill, 1),
        at_least("kills: worker SIGTERMs", kills.sigterm, 1),
        at_least(
            "kills: workers frozen (SIGSTOP, then SIGCONT)",
            kills.sigstop,
            1,
        ),
        at_least(
            "kills: crashes through POST /crash_application answered 202",
            kills.crash_endpoint,
            1,
        ),
        at_least("kills: API SIGKILLs and restarts", kills.api_kill, 1),
        (
            format!(
                "kills: PostgreSQL restarts: {} (exactly {restarts})",
                kills.db_restart
            ),
            if kills.db_restart == restarts {
                vec![]
            } else {
                vec![format!(
                    "{} restarts, expected {restarts}",
                    kills.db_restart
                )]
            },
        ),
    ]
}

async fn fleet_keep_quiet(pool: &PgPool) -> anyhow::Result<bool> {
    let busy: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM workflows WHERE status IN ('enqueued', 'running')
            OR (status = 'waiting' AND (wait_until IS NULL OR wait_until < now() - interval '5 seconds'))",
    )
    .fetch_one(pool)
    .await?;
    let waiting: i64 =
        sqlx::query_scalar("SELECT count(*) FROM workflows WHERE status = 'waiting'")
            .fetch_one(pool)
            .await?;
    Ok(busy == 0 && waiting == 0)
}

type Check = (String, Vec<String>);

async fn rows(pool: &PgPool, sql: &'static str) -> anyhow::Result<Vec<String>> {
    Ok(sqlx::query_scalar(sql).fetch_all(pool).await?)
}

async fn count(pool: &PgPool, sql: &'static str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(sql).fetch_one(pool).await?)
}

async fn invariants(
    pool: &PgPool,
    shared: &Shared,
    kills: &Kills,
    initial_stock: i32,
) -> anyhow::Result<Vec<Check>> {
    let mut checks = Vec::new();
    let initial = i64::from(initial_stock);
    let (stock, live, restocked): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT inventory FROM products WHERE id = 1)::bigint,
                (SELECT count(*) FROM orders WHERE status <> 'CANCELLED'),
                (SELECT coalesce(sum(amount), 0) FROM chaos_restocks)::bigint",
    )
    .fetch_one(pool)
    .await?;
    checks.push((
        format!(
            "2 stock conserved: initial {initial} + restocked {restocked} = current {stock} + orders not cancelled {live}"
        ),
        if initial + restocked == stock + live {
            vec![]
        } else {
            vec![format!(
                "{initial} + {restocked} = {} != {}",
                initial + restocked,
                stock + live
            )]
        },
    ));
    let mut one_order = rows(
        pool,
        "SELECT 'checkout ' || w.id || ' has ' || count(o.id) || ' orders'
         FROM workflows w JOIN workflow_events e ON e.workflow_id = w.id AND e.key = 'payment_id' AND e.value <> 'null'::jsonb
         LEFT JOIN orders o ON o.checkout_id = w.id
         WHERE w.kind = 'checkout' GROUP BY w.id HAVING count(o.id) <> 1",
    )
    .await?;
    one_order.extend(
        rows(
            pool,
            "SELECT 'order ' || o.id || ' has no checkout' FROM orders o
             LEFT JOIN workflows w ON w.id = o.checkout_id AND w.kind = 'checkout' WHERE w.id IS NULL",
        )
        .await?,
    );
    let handed_out: Vec<String> = shared
        .records
        .lock()
        .unwrap()
        .key_to_payment
        .values()
        .cloned()
        .collect();
    let with_order: Vec<String> =
        sqlx::query_scalar("SELECT checkout_id FROM orders WHERE checkout_id = ANY($1)")
            .bind(&handed_out)
            .fetch_all(pool)
            .await?;
    if with_order.len() != handed_out.len() {
        one_order.push(format!(
            "{} payment ids handed to clients, {} have an order",
            handed_out.len(),
            with_order.len()
        ));
    }
    checks.push((
        "3 every payment id handed out has exactly one order; no order without a checkout".into(),
        one_order,
    ));
    checks.push((
        "4 every order is DISPATCHED or CANCELLED (or waiting for a payment still due)".into(),
        rows(
            pool,
            "SELECT 'order ' || o.id || ' ' || o.status FROM orders o
             JOIN workflows w ON w.id = o.checkout_id
             WHERE o.status NOT IN ('DISPATCHED', 'CANCELLED')
               AND NOT (o.status = 'PENDING' AND w.status = 'waiting' AND w.wait_until > now())",
        )
        .await?,
    ));
    let mut dispatched = rows(
        pool,
        "SELECT 'order ' || o.id || ': progress ' || o.progress_remaining || ', dispatch workflows '
                || (SELECT count(*) FROM workflows d WHERE d.id = 'dispatch-' || o.id)
         FROM orders o WHERE o.status IN ('PAID', 'DISPATCHED')
           AND (o.progress_remaining <> 0
                OR (SELECT count(*) FROM workflows d WHERE d.id = 'dispatch-' || o.id AND d.status = 'succeeded') <> 1)",
    )
    .await?;
    dispatched.extend(
        rows(
            pool,
            "SELECT 'checkout ' || e.workflow_id || ' was paid but its order is ' || o.status
             FROM workflow_events e JOIN orders o ON o.checkout_id = e.workflow_id
             WHERE e.key = 'payment_outcome' AND e.value = '\"paid\"'::jsonb AND o.status <> 'DISPATCHED'",
        )
        .await?,
    );
    checks.push((
        "5 every paid order dispatched exactly once (one dispatch that succeeded, progress 0)"
            .into(),
        dispatched,
    ));

    // Each progress step's effect once: its checkpoint's output is the
    // progress left after it, so the steps read 9, 8, ..., 0 exactly. A
    // step applied twice skips a number and leaves a trailing null (the
    // statement's guard makes a step after zero do nothing): the same
    // count of steps and the same final state.
    let expected = json!((0..store::DISPATCH_STEPS).rev().collect::<Vec<_>>());
    let progress: Vec<String> = sqlx::query_scalar(
        "SELECT 'order ' || o.id || ' (' || o.status || '): progress steps left '
                || coalesce(p.outputs::text, '[]')
         FROM orders o
         LEFT JOIN LATERAL (
             SELECT jsonb_agg(s.output ORDER BY s.step_seq) AS outputs FROM workflow_steps s
             WHERE s.workflow_id = 'dispatch-' || o.id AND s.name = 'update_progress') p ON true
         WHERE o.status IN ('PAID', 'DISPATCHED') AND p.outputs IS DISTINCT FROM $1
         ORDER BY o.id",
    )
    .bind(&expected)
    .fetch_all(pool)
    .await?;
    let paid_orders = count(
        pool,
        "SELECT count(*) FROM orders WHERE status IN ('PAID', 'DISPATCHED')",
    )
    .await?;
    checks.push((
        format!(
            "6 every progress step applied once: each of {paid_orders} paid orders' update_progress outputs read {expected}"
        ),
        progress,
    ));

    // The other steps whose guard (a PENDING order) would hide a second
    // application: each outputs true when it acted.
    let mut guarded = rows(
        pool,
        "SELECT 'checkout ' || s.workflow_id || ': ' || s.name || ' (step ' || s.step_seq || ') output '
                || s.output::text
         FROM workflow_steps s JOIN workflows w ON w.id = s.workflow_id AND w.kind = 'checkout'
         WHERE s.name IN ('mark_paid', 'cancel_order') AND s.output <> 'true'::jsonb
         ORDER BY s.workflow_id",
    )
    .await?;
    guarded.extend(
        rows(
            pool,
            "SELECT 'checkout ' || o.checkout_id || ' (order ' || o.id || '): reserve_inventory outputs '
                    || coalesce((SELECT string_agg(s.output::text, ', ') FROM workflow_steps s
                                 WHERE s.workflow_id = o.checkout_id AND s.name = 'reserve_inventory'), 'none')
             FROM orders o
             WHERE (SELECT count(*) FILTER (WHERE s.output = 'true'::jsonb) || '/' || count(*) FROM workflow_steps s
                    WHERE s.workflow_id = o.checkout_id AND s.name = 'reserve_inventory') <> '1/1'
             ORDER BY o.id",
        )
        .await?,
    );
    guarded.extend(
        rows(
            pool,
            "SELECT 'checkout ' || e.workflow_id || ' settled ' || e.value::text || ' without its '
                    || CASE WHEN e.value = '\"paid\"'::jsonb THEN 'mark_paid' ELSE 'cancel_order' END || ' step'
             FROM workflow_events e
             WHERE e.key = 'payment_outcome' AND NOT EXISTS (
                 SELECT 1 FROM workflow_steps s WHERE s.workflow_id = e.workflow_id
                   AND s.name = CASE WHEN e.value = '\"paid\"'::jsonb THEN 'mark_paid' ELSE 'cancel_order' END)
             ORDER BY e.workflow_id",
        )
        .await?,
    );
    let settled = count(
        pool,
        "SELECT count(*) FROM workflow_steps WHERE name IN ('mark_paid', 'cancel_order')",
    )
    .await?;
    checks.push((
        format!(
            "7 guarded steps acted once: {settled} mark_paid/cancel_order and every order's reserve_inventory output true"
        ),
        guarded,
    ));

    // A payment message consumed by a checkout that then timed out: the
    // checkout took the payment and forgot it.
    let lost = rows(
        pool,
        "SELECT 'checkout ' || e.workflow_id || ' timed out but consumed payment message ' || m.id
                || ' (' || m.payload::text || ', created ' || m.created_at || ', consumed ' || m.consumed_at || ')'
         FROM workflow_events e
         JOIN workflow_messages m ON m.workflow_id = e.workflow_id AND m.topic = 'payment_status'
              AND m.consumed_at IS NOT NULL
         WHERE e.key = 'payment_outcome' AND e.value = '\"timed_out\"'::jsonb
         ORDER BY e.workflow_id",
    )
    .await?;
    let timed_out = count(
        pool,
        "SELECT count(*) FROM workflow_events WHERE key = 'payment_outcome' AND value = '\"timed_out\"'::jsonb",
    )
    .await?;
    checks.push((
        format!(
            "8 no payment lost: none of {timed_out} timed-out checkouts consumed a payment message"
        ),
        lost,
    ));

    // Every 409 checkout_expired a client got: the checkout timed out, its
    // deadline had passed when the 409 was answered, and no payment message
    // of it had arrived before that deadline.
    let (expired_ids, expired_at): (Vec<String>, Vec<DateTime<Utc>>) = shared
        .records
        .lock()
        .unwrap()
        .expired
        .iter()
        .cloned()
        .unzip();
    let expired = sqlx::query_scalar(
        "WITH answered AS (
             SELECT a.id, a.at, (SELECT e.value FROM workflow_events e
                                 WHERE e.workflow_id = a.id AND e.key = 'payment_outcome') AS outcome,
                    (SELECT min((s.output #>> '{}')::timestamptz) FROM workflow_steps s
                     WHERE s.workflow_id = a.id AND s.name = 'recv:payment_status:deadline') AS deadline
             FROM unnest($1::text[], $2::timestamptz[]) AS a(id, at)),
         early AS (
             SELECT a.*, (SELECT count(*) FROM workflow_messages m WHERE m.workflow_id = a.id
                            AND m.topic = 'payment_status' AND m.created_at < a.deadline) AS messages
             FROM answered a)
         SELECT 'payment ' || id || ' answered checkout_expired at ' || at || ': outcome '
                || coalesce(outcome::text, 'none') || ', deadline ' || coalesce(deadline::text, 'none')
                || ', payment messages before the deadline ' || messages
         FROM early
         WHERE outcome IS DISTINCT FROM '\"timed_out\"'::jsonb OR deadline IS NULL OR deadline > at
               OR messages > 0
         ORDER BY at",
    )
    .bind(&expired_ids)
    .bind(&expired_at)
    .fetch_all(pool)
    .await?;
    checks.push((
        format!(
            "9 every webhook 409 checkout_expired ({} answered) matches a payment window that closed before the payment arrived",
            expired_ids.len()
        ),
        expired,
    ));

    let mut stuck = rows(
        pool,
        "SELECT 'workflow ' || id || ' ' || status || coalesce(' on ' || owner, '') FROM workflows
         WHERE status IN ('running', 'enqueued') OR (status = 'failed')",
    )
    .await?;
    stuck.extend(
        rows(
            pool,
            "SELECT 'job ' || id || ' ' || status || ' by ' || coalesce(lock_by, '-') FROM apalis.jobs j
             WHERE (status IN ('Queued', 'Running') AND NOT EXISTS (SELECT 1 FROM workers k WHERE k.id = split_part(j.lock_by, '/', 1)))
                OR (status = 'Pending' AND run_at < now() - interval '10 seconds')",
        )
        .await?,
    );
    checks.push((
        "10 no workflow left on a dead worker, none failed, no job stuck".into(),
        stuck,
    ));
    checks.push((
        "11 clients saw one payment id per key and one order id per payment".into(),
        shared.records.lock().unwrap().inconsistencies.clone(),
    ));
    let grace = chrono::Duration::seconds(15);
    let bad_5xx: Vec<String> = shared
        .records
        .lock()
        .unwrap()
        .server_errors
        .iter()
        .filter(|(at, status, _)| {
            let during_outage = kills
                .db_down
                .is_some_and(|(down, up)| *at >= down && *at <= up + grace);
            !(during_outage && matches!(status, 503 | 504))
        })
        .map(|(at, status, code)| format!("{status} {code} at {at}"))
        .collect();
    checks.push((
        "12 no 5xx except 503/504 while the database was down".into(),
        bad_5xx,
    ));
    let signed = shared.records.lock().unwrap().signed;
    checks.push((
        format!(
            "13 the payment ledger balances: each signed success ({signed} flows) is a paid order's or a refund due, exactly once"
        ),
        rows(
            pool,
            "SELECT 'delivery ' || l.delivery_id || ' (' || l.outcome || '): '
                 || paid.n || ' paid orders, ' || refunded.n || ' refunds due'
             FROM payment_ledger l,
                 LATERAL (SELECT count(*) AS n FROM orders o
                          WHERE o.paid_by = l.delivery_id AND o.status IN ('PAID', 'DISPATCHED')) paid,
                 LATERAL (SELECT count(*) AS n FROM refunds_due r WHERE r.delivery_id = l.delivery_id) refunded
             WHERE l.type = 'payment.succeeded' AND l.outcome <> 'mismatch'
               AND paid.n + refunded.n <> 1
             UNION ALL
             SELECT 'only ' || count(*) || ' signed successes in the ledger' FROM payment_ledger
             WHERE type = 'payment.succeeded' HAVING count(*) < 1",
        )
        .await?,
    ));
    let cancelled = shared.records.lock().unwrap().admin_cancelled.clone();
    let ended: Vec<String> = sqlx::query_scalar(
        "SELECT 'checkout ' || w.id || ' ' || w.status || ', its order ' || coalesce(o.status, 'none')
         FROM workflows w LEFT JOIN orders o ON o.checkout_id = w.id
         WHERE w.id = ANY($1)
           AND NOT ((w.status = 'cancelled' AND o.status = 'CANCELLED')
                    OR (w.status = 'succeeded' AND o.status IN ('PAID', 'DISPATCHED')))",
    )
    .bind(&cancelled)
    .fetch_all(pool)
    .await?;
    checks.push((
        format!(
            "14 each checkout an operator cancelled ({}) ended cancelled with its order CANCELLED (or, paid first, succeeded)",
            cancelled.len()
        ),
        ended,
    ));
    Ok(checks)
}
